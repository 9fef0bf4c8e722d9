"""Data sources (cloud/ml/datasources.py): image folders, `.npz` files and the built-ins load with the
data's own shape, classes and scale; every bad file or option is one DataError line naming it."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from cloud.exceptions import DataError
from cloud.ml.datasources import (
    FolderSource,
    NpzSource,
    load_dataset,
)

HEIGHT, WIDTH = 4, 5
Pixels = npt.NDArray[np.uint8]


def grey(value: int, height: int = HEIGHT, width: int = WIDTH) -> Pixels:
    """A grey image whose pixels count up from `value` (row by row), so orientation shows."""
    return (value + np.arange(height * width).reshape(height, width)).astype(np.uint8)


def rgb(value: int, height: int = HEIGHT, width: int = WIDTH) -> Pixels:
    """An RGB image whose three channels differ: `value` + i, + 50 + i and + 100 + i at pixel i."""
    base = grey(value, height, width).astype(np.int64)
    return np.stack([base, base + 50, base + 100], axis=-1).astype(np.uint8)


def flat(value: int, channels: int = 1, height: int = HEIGHT, width: int = WIDTH) -> Pixels:
    """A uniform image (JPEG keeps it exact, up to rounding)."""
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.full(shape, value, np.uint8)


def save(path: Path, pixels: Pixels) -> Path:
    """Write `pixels` as the image file `path` (its suffix picks PNG or JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_npz(path: Path, **arrays: npt.ArrayLike) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def assert_one_line_naming(error: BaseException, *names: object) -> None:
    """The error's text is one line and names each of `names` (a file, folder or option)."""
    message = str(error)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, message


def png_bytes(pixels: Pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# Image folders ---------------------------------------------------------------------------------


def test_an_image_folder_loads_grey_pngs_and_jpegs_with_classes_in_folder_name_order(tmp_path: Path) -> None:
    # Prepare: folders made out of order; files within a class are taken in name order
    save(tmp_path / "zebra" / "a.png", grey(60))
    save(tmp_path / "ant" / "a.png", grey(0))
    save(tmp_path / "ant" / "b.jpg", flat(120))
    save(tmp_path / "mole" / "a.jpeg", flat(200))
    save(tmp_path / "mole" / "b.png", grey(30))

    # Execute
    dataset = load_dataset(FolderSource(folder=tmp_path))

    # Assert
    assert dataset.inputs.shape == (5, 1, HEIGHT, WIDTH)
    assert dataset.inputs.dtype == np.float32
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2]
    assert dataset.class_names == ("ant", "mole", "zebra")
    assert dataset.num_classes == 3
    assert dataset.input_scale == 255.0
    assert dataset.images is True
    assert dataset.pixel_scale == 255.0
    assert dataset.input_shape == (1, HEIGHT, WIDTH)
    np.testing.assert_array_equal(dataset.inputs[0, 0], grey(0))
    np.testing.assert_array_equal(dataset.inputs[3, 0], grey(30))
    np.testing.assert_array_equal(dataset.inputs[4, 0], grey(60))
    np.testing.assert_allclose(dataset.inputs[1], 120.0, atol=2)  # JPEG: lossy, a flat image nearly exact
    np.testing.assert_allclose(dataset.inputs[2], 200.0, atol=2)


def test_an_image_folder_of_rgb_images_loads_channels_first(tmp_path: Path) -> None:
    # Prepare
    save(tmp_path / "cat" / "1.png", rgb(0))
    save(tmp_path / "cat" / "2.jpg", flat(90, channels=3))
    save(tmp_path / "dog" / "1.png", rgb(7))

    # Execute
    dataset = load_dataset(FolderSource(folder=tmp_path))

    # Assert
    assert dataset.inputs.shape == (3, 3, HEIGHT, WIDTH)
    assert dataset.labels.tolist() == [0, 0, 1]
    assert dataset.class_names == ("cat", "dog")
    assert dataset.pixel_scale == 255.0
    np.testing.assert_array_equal(dataset.inputs[0], rgb(0).transpose(2, 0, 1))
    np.testing.assert_array_equal(dataset.inputs[2], rgb(7).transpose(2, 0, 1))
    np.testing.assert_allclose(dataset.inputs[1], 90.0, atol=2)


def test_size_resizes_every_image_of_a_folder(tmp_path: Path) -> None:
    # Prepare: images of two sizes, neither of them the size asked for
    save(tmp_path / "a" / "1.png", flat(40, height=6, width=8))
    save(tmp_path / "b" / "1.png", flat(80, height=HEIGHT, width=WIDTH))

    # Execute
    dataset = load_dataset(FolderSource(folder=tmp_path, size=(12, 10)))

    # Assert: (height, width); a flat image stays flat when resized
    assert dataset.inputs.shape == (2, 1, 12, 10)
    np.testing.assert_array_equal(dataset.inputs[0], 40.0)
    np.testing.assert_array_equal(dataset.inputs[1], 80.0)


def test_channels_1_converts_rgb_images_to_grey(tmp_path: Path) -> None:
    # Prepare
    save(tmp_path / "a" / "1.png", rgb(0))
    save(tmp_path / "b" / "1.png", rgb(9))

    # Execute
    dataset = load_dataset(FolderSource(folder=tmp_path, channels=1))

    # Assert
    assert dataset.inputs.shape == (2, 1, HEIGHT, WIDTH)
    expected = np.asarray(Image.fromarray(rgb(9)).convert("L"), np.float32)
    np.testing.assert_array_equal(dataset.inputs[1, 0], expected)


def test_channels_3_converts_grey_images_to_rgb_even_mixed_with_rgb_ones(tmp_path: Path) -> None:
    # Prepare: a grey image first, an RGB one after it
    save(tmp_path / "a" / "1.png", grey(10))
    save(tmp_path / "b" / "1.png", rgb(20))

    # Execute
    dataset = load_dataset(FolderSource(folder=tmp_path, channels=3))

    # Assert
    assert dataset.inputs.shape == (2, 3, HEIGHT, WIDTH)
    for channel in range(3):
        np.testing.assert_array_equal(dataset.inputs[0, channel], grey(10))
    np.testing.assert_array_equal(dataset.inputs[1], rgb(20).transpose(2, 0, 1))


def test_files_that_are_not_images_and_hidden_folders_are_ignored(tmp_path: Path) -> None:
    # Prepare
    save(tmp_path / "a" / "1.png", grey(0))
    save(tmp_path / "b" / "1.PNG", grey(5))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "labels.csv").write_text("1.png,b\n")
    (tmp_path / "README").write_text("a loose file beside the class folders")
    save(tmp_path / ".thumbnails" / "1.png", grey(9))
    (tmp_path / "empty").mkdir()  # a folder with no images is not a class

    # Execute
    dataset = load_dataset(FolderSource(folder=tmp_path))

    # Assert
    assert dataset.class_names == ("a", "b")
    assert dataset.labels.tolist() == [0, 1]


FolderCase = Callable[[Path], tuple[FolderSource, Path]]


def mixed_sizes(root: Path) -> tuple[FolderSource, Path]:
    save(root / "a" / "1.png", grey(0))
    return FolderSource(folder=root), save(root / "b" / "1.png", grey(0, height=HEIGHT + 1))


def mixed_modes(root: Path) -> tuple[FolderSource, Path]:
    save(root / "a" / "1.png", grey(0))
    return FolderSource(folder=root), save(root / "b" / "1.png", rgb(0))


def one_class(root: Path) -> tuple[FolderSource, Path]:
    save(root / "a" / "1.png", grey(0))
    save(root / "a" / "2.png", grey(1))
    return FolderSource(folder=root), root


def empty_folder(root: Path) -> tuple[FolderSource, Path]:
    return FolderSource(folder=root), root


def corrupt_image(root: Path) -> tuple[FolderSource, Path]:
    save(root / "a" / "1.png", grey(0))
    bad = root / "b" / "x.png"
    bad.parent.mkdir()
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())
    return FolderSource(folder=root), bad


def truncated_png(root: Path) -> tuple[FolderSource, Path]:
    save(root / "a" / "1.png", grey(0))
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    data = png_bytes(noise)
    bad = root / "b" / "1.png"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    return FolderSource(folder=root), bad


def a_file(root: Path) -> tuple[FolderSource, Path]:
    path = save(root / "1.png", grey(0))
    return FolderSource(folder=path), path


def missing_folder(root: Path) -> tuple[FolderSource, Path]:
    return FolderSource(folder=root / "missing"), root / "missing"


@pytest.mark.parametrize(
    ("build", "says"),
    [
        pytest.param(mixed_sizes, "set `size` to resize", id="mixed-sizes"),
        pytest.param(mixed_modes, "set `channels` to convert", id="mixed-modes"),
        pytest.param(one_class, r"at least 2; found 1 \(a\)", id="one-class"),
        pytest.param(empty_folder, r"at least 2; found 0 \(none\)", id="empty-folder"),
        pytest.param(corrupt_image, "not a readable image", id="corrupt-image"),
        pytest.param(truncated_png, "not a readable image", id="truncated-png"),
        pytest.param(a_file, "not a folder", id="a-file"),
        pytest.param(missing_folder, "not a folder", id="missing-folder"),
    ],
)
def test_a_bad_image_folder_is_one_line_naming_the_file_or_folder(
    tmp_path: Path, build: FolderCase, says: str
) -> None:
    # Prepare
    source, offender = build(tmp_path)

    # Execute
    with pytest.raises(DataError, match=says) as raised:
        load_dataset(source)

    # Assert
    assert_one_line_naming(raised.value, offender)


# .npz files ------------------------------------------------------------------------------------


def test_an_npz_of_vectors_is_not_images_and_is_scaled_by_its_largest_magnitude(tmp_path: Path) -> None:
    # Prepare
    x = np.array([[1.0, -7.5, 2.0], [0.5, 3.0, 4.0], [6.0, 0.0, 1.0]], np.float64)
    path = write_npz(tmp_path / "v.npz", x=x, y=np.array([1, 0, 1]), class_names=np.array(["no", "yes"]))

    # Execute
    dataset = load_dataset(NpzSource(npz=path))

    # Assert
    assert dataset.inputs.shape == (3, 3)
    assert dataset.inputs.dtype == np.float32
    np.testing.assert_array_equal(dataset.inputs, x.astype(np.float32))
    assert dataset.labels.tolist() == [1, 0, 1]
    assert dataset.labels.dtype == np.int64
    assert dataset.input_scale == 7.5
    assert dataset.images is False
    assert dataset.pixel_scale is None
    assert dataset.class_names == ("no", "yes")
    assert dataset.name == str(path)


def test_an_npz_of_grey_uint8_images_gets_a_channel_and_the_pixel_scale(tmp_path: Path) -> None:
    # Prepare
    x = np.stack([grey(i) for i in range(4)])
    path = write_npz(tmp_path / "g.npz", x=x, y=np.array([0, 1, 2, 0], np.uint8))

    # Execute
    dataset = load_dataset(NpzSource(npz=path))

    # Assert
    assert dataset.inputs.shape == (4, 1, HEIGHT, WIDTH)
    np.testing.assert_array_equal(dataset.inputs[:, 0], x)
    assert dataset.input_scale == dataset.pixel_scale == 255.0
    assert dataset.images is True
    assert dataset.class_names == ("0", "1", "2")


def test_an_npz_of_channels_last_rgb_images_is_made_channels_first(tmp_path: Path) -> None:
    # Prepare
    x = np.stack([rgb(i) for i in range(3)])
    path = write_npz(tmp_path / "rgb.npz", x=x, y=np.array([0, 1, 1]))

    # Execute
    dataset = load_dataset(NpzSource(npz=path))

    # Assert
    assert dataset.inputs.shape == (3, 3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(dataset.inputs, x.transpose(0, 3, 1, 2))
    assert dataset.inputs.flags.c_contiguous
    assert dataset.input_shape == (3, HEIGHT, WIDTH)


def test_an_npz_of_float_images_is_scaled_by_its_largest_value(tmp_path: Path) -> None:
    # Prepare
    x = np.stack([grey(i) for i in range(2)]).astype(np.float32) / 200.0
    path = write_npz(tmp_path / "f.npz", x=x, y=np.array([0, 1]))

    # Execute
    dataset = load_dataset(NpzSource(npz=path))

    # Assert
    assert dataset.images is True
    assert dataset.input_scale == pytest.approx(float(x.max()))
    assert dataset.pixel_scale == dataset.input_scale


VECTORS = np.arange(1.0, 13.0).reshape(4, 3)
LABELS = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("arrays", "says"),
    [
        pytest.param({"x": VECTORS}, "has no `y` array", id="no-y"),
        pytest.param({"y": LABELS}, "has no `x` array", id="no-x"),
        pytest.param(
            {"x": VECTORS, "y": LABELS.astype(np.float64)}, "one integer label per sample", id="y-float"
        ),
        pytest.param({"x": VECTORS, "y": LABELS[:, None]}, "one integer label per sample", id="y-2d"),
        pytest.param({"x": VECTORS, "y": LABELS[:3]}, "x has 4 samples, y 3 labels", id="lengths-differ"),
        pytest.param({"x": VECTORS, "y": np.array([0, 1, -1, 1])}, "negative labels", id="negative-label"),
        pytest.param(
            {"x": VECTORS, "y": np.array([0, 2, 0, 2])}, "class 1 has no samples", id="class-without-samples"
        ),
        pytest.param({"x": VECTORS, "y": np.zeros(4, np.int64)}, "at least 2 classes", id="one-class"),
        pytest.param({"x": np.where(VECTORS > 5, np.nan, VECTORS), "y": LABELS}, "NaN or infinite", id="nan"),
        pytest.param(
            {"x": np.where(VECTORS > 5, np.inf, VECTORS), "y": LABELS}, "NaN or infinite", id="infinity"
        ),
        pytest.param({"x": np.zeros_like(VECTORS), "y": LABELS}, "every value of x is 0", id="all-zero"),
        pytest.param({"x": VECTORS.astype(str), "y": LABELS}, "not numbers", id="x-strings"),
        pytest.param(
            {"x": VECTORS, "y": LABELS, "class_names": np.array(["a", "b", "c"])},
            "3 class names for 2",
            id="class-names-too-many",
        ),
        pytest.param(
            {"x": VECTORS, "y": LABELS, "class_names": np.array([3, 4])},
            "list of strings",
            id="class-names-not-strings",
        ),
        pytest.param({"x": np.ones((4, 1, 2, 2, 1)), "y": LABELS}, "N×D vectors or N×H×W", id="x-5d"),
        pytest.param({"x": np.ones((4, 5, 2, 2)), "y": LABELS}, "1 or 3 channels", id="x-4-channels"),
    ],
)
def test_a_bad_npz_is_one_line_naming_the_file(
    tmp_path: Path, arrays: dict[str, npt.ArrayLike], says: str
) -> None:
    # Prepare
    path = write_npz(tmp_path / "bad.npz", **arrays)

    # Execute
    with pytest.raises(DataError, match=says) as raised:
        load_dataset(NpzSource(npz=path))

    # Assert
    assert_one_line_naming(raised.value, path)


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8).tobytes(),
        b"PK\x03\x04 the start of a zip and nothing more",
        b"",
    ],
    ids=["random-bytes", "broken-zip", "empty"],
)
def test_a_file_that_is_not_an_npz_is_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    # Prepare
    path = tmp_path / "data.npz"
    path.write_bytes(content)

    # Execute
    with pytest.raises(DataError, match="not a readable .npz") as raised:
        load_dataset(NpzSource(npz=path))

    # Assert
    assert_one_line_naming(raised.value, path)


class LeavesAMark:
    """Unpickling this creates the file `path`: proof that a pickle inside the data was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def test_an_npz_of_object_arrays_is_refused_without_unpickling_it(tmp_path: Path) -> None:
    # Prepare
    mark = tmp_path / "unpickled"
    path = tmp_path / "objects.npz"
    x = np.array([LeavesAMark(mark), 1.0, 2.0, 3.0], dtype=object)
    np.savez(path, x=x, y=LABELS)

    # Execute
    with pytest.raises(DataError, match="not a readable .npz") as raised:
        load_dataset(NpzSource(npz=path))

    # Assert
    assert_one_line_naming(raised.value, path)
    assert not mark.exists()


def test_an_npz_with_an_absurdly_large_label_is_one_line_naming_the_file(tmp_path: Path) -> None:
    # Prepare
    path = write_npz(tmp_path / "huge.npz", x=VECTORS[:3], y=np.array([0, 1, 2**62]))

    # Execute
    with pytest.raises(DataError) as raised:
        load_dataset(NpzSource(npz=path))

    # Assert
    assert_one_line_naming(raised.value, path)


# The --data option and the scenario's `dataset` -------------------------------------------------
