"""Image files as model inputs (device_firmware_py/images.py): decoded to the model's C×H×W pixels /
pixel_scale, refused with an ImageError naming the file; and the directory source and feedback store
taking image files for a model that takes images."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydantic import ValidationError

from device_firmware_py import images
from device_firmware_py.exceptions import FeedbackError, ImageError
from device_firmware_py.feedback import FeedbackStore
from device_firmware_py.images import ImageInput
from device_firmware_py.sources import DirectorySource
from wire import ArtifactManifest
from wire.arrays import EncodedArray
from wire.manifest import TensorSpec

ROOT = Path(__file__).resolve().parents[2]
HEIGHT, WIDTH = 4, 5
GREY = ImageInput(channels=1, height=HEIGHT, width=WIDTH, pixel_scale=255.0)
COLOUR = ImageInput(channels=3, height=HEIGHT, width=WIDTH, pixel_scale=127.5)
Pixels = npt.NDArray[np.uint8]


def image_manifest(input_shape: list[int], pixel_scale: float | None) -> ArtifactManifest:
    """A valid manifest of a 3-class model taking `input_shape` (the device reads only its fields)."""
    c, d = 3, 2
    return ArtifactManifest(
        model_id="cam.v1",
        line="cam",
        version=1,
        sha256=hashlib.sha256(b"model").hexdigest(),
        size=5,
        signature="serving_default",
        input=TensorSpec(name="x", shape=input_shape, scale=0.02, zero_point=-128),
        features=TensorSpec(name="features", shape=[1, d], scale=0.1, zero_point=0),
        logits=TensorSpec(name="logits", shape=[1, c], scale=0.2, zero_point=0),
        num_classes=c,
        feature_dim=d,
        head_weight=EncodedArray.from_numpy(np.ones((c, d)), "float32"),
        head_bias=EncodedArray.from_numpy(np.zeros(c), "float32"),
        probes=[],
        pixel_scale=pixel_scale,
    )


def grey(value: int, height: int = HEIGHT, width: int = WIDTH) -> Pixels:
    """A grey image whose pixels count up from `value` (row by row), so orientation shows."""
    return (value + np.arange(height * width).reshape(height, width)).astype(np.uint8)


def rgb(value: int, height: int = HEIGHT, width: int = WIDTH) -> Pixels:
    """An RGB image whose three channels differ: `value` + i, + 50 + i and + 100 + i at pixel i."""
    base = grey(value, height, width).astype(np.int64)
    return np.stack([base, base + 50, base + 100], axis=-1).astype(np.uint8)


def save(path: Path, pixels: Pixels) -> Path:
    """Write `pixels` as the image file `path` (its suffix picks PNG or JPEG)."""
    Image.fromarray(pixels).save(path)
    return path


def png_bytes(pixels: Pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# ImageInput.of -----------------------------------------------------------------------------------


def test_a_manifest_with_pixel_scale_gives_the_models_channels_height_and_width() -> None:
    # Prepare
    manifest = image_manifest([1, 3, 12, 10], pixel_scale=255.0)

    # Execute
    image = ImageInput.of(manifest)

    # Assert
    assert image == ImageInput(channels=3, height=12, width=10, pixel_scale=255.0)


@pytest.mark.parametrize("input_shape", [[1, 64], [1, 1, 8, 8]], ids=["vectors", "image-shaped"])
def test_a_manifest_without_pixel_scale_takes_no_images(input_shape: list[int]) -> None:
    # Prepare
    manifest = image_manifest(input_shape, pixel_scale=None)

    # Execute
    image = ImageInput.of(manifest)

    # Assert
    assert image is None


@pytest.mark.parametrize(
    "input_shape", [[1, 64], [1, 8, 8], [1, 2, 8, 8]], ids=["vectors", "3d", "2-channels"]
)
def test_pixel_scale_is_only_for_b_c_h_w_inputs_of_1_or_3_channels(input_shape: list[int]) -> None:
    # Execute / Assert: so ImageInput.of can take the shape apart without checking it
    with pytest.raises(ValidationError, match="pixel_scale is for image inputs"):
        image_manifest(input_shape, pixel_scale=255.0)


# Decoding ----------------------------------------------------------------------------------------


def test_a_grey_png_decodes_to_1_h_w_pixels_over_the_pixel_scale(tmp_path: Path) -> None:
    # Prepare
    path = save(tmp_path / "x.png", grey(10))

    # Execute
    sample = GREY.decode(path)

    # Assert
    assert sample.shape == (1, HEIGHT, WIDTH)
    assert sample.dtype == np.float32
    assert sample.flags.c_contiguous
    np.testing.assert_array_equal(sample[0], grey(10).astype(np.float32) / np.float32(255.0))


def test_an_rgb_png_decodes_channels_first(tmp_path: Path) -> None:
    # Prepare
    path = save(tmp_path / "x.PNG", rgb(3))

    # Execute
    sample = COLOUR.decode(path)

    # Assert
    assert sample.shape == (3, HEIGHT, WIDTH)
    assert sample.dtype == np.float32
    np.testing.assert_array_equal(sample, rgb(3).transpose(2, 0, 1).astype(np.float32) / np.float32(127.5))


def test_a_jpeg_decodes_like_a_png_up_to_its_compression(tmp_path: Path) -> None:
    # Prepare: a flat image, which JPEG keeps (nearly) exact
    path = save(tmp_path / "x.jpg", np.full((HEIGHT, WIDTH, 3), 200, np.uint8))

    # Execute
    sample = COLOUR.decode(path)

    # Assert
    assert sample.shape == (3, HEIGHT, WIDTH)
    np.testing.assert_allclose(sample, 200 / 127.5, atol=2 / 127.5)


def test_an_image_of_another_size_is_resized_to_the_models_height_and_width(tmp_path: Path) -> None:
    # Prepare: 9×7 to the model's 4×5 (height × width; Pillow sizes are width × height)
    pixels = grey(0, height=9, width=7)
    path = save(tmp_path / "x.png", pixels)

    # Execute
    sample = GREY.decode(path)

    # Assert
    assert sample.shape == (1, HEIGHT, WIDTH)
    resized = Image.fromarray(pixels).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(sample[0], np.asarray(resized, np.float32) / np.float32(255.0))


def test_an_rgb_file_is_made_grey_for_a_1_channel_model_and_a_grey_one_rgb_for_3(tmp_path: Path) -> None:
    # Prepare
    colour = save(tmp_path / "colour.png", rgb(5))
    grey_file = save(tmp_path / "grey.png", grey(5))

    # Execute
    made_grey = GREY.decode(colour)
    made_rgb = COLOUR.decode(grey_file)

    # Assert
    luminance = np.asarray(Image.fromarray(rgb(5)).convert("L"), np.float32)
    np.testing.assert_array_equal(made_grey, luminance[None] / np.float32(255.0))
    assert made_rgb.shape == (3, HEIGHT, WIDTH)
    for channel in made_rgb:
        np.testing.assert_array_equal(channel, grey(5).astype(np.float32) / np.float32(127.5))


def test_an_rgba_file_loses_its_alpha(tmp_path: Path) -> None:
    # Prepare
    pixels = np.concatenate([rgb(1), np.full((HEIGHT, WIDTH, 1), 9, np.uint8)], axis=-1)
    path = save(tmp_path / "x.png", pixels)

    # Execute
    sample = COLOUR.decode(path)

    # Assert
    np.testing.assert_array_equal(sample, rgb(1).transpose(2, 0, 1).astype(np.float32) / np.float32(127.5))


def corrupt(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())


def truncated(path: Path) -> None:
    data = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def directory(path: Path) -> None:
    path.mkdir()


def missing(path: Path) -> None:
    pass


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(corrupt, "is not a readable image", id="corrupt"),
        pytest.param(truncated, "is not a readable image", id="truncated"),
        pytest.param(empty, "is not a readable image", id="empty"),
        pytest.param(directory, "is not a regular file", id="directory"),
        pytest.param(missing, "cannot open", id="missing"),
    ],
)
def test_what_is_not_an_image_file_is_an_image_error_naming_it(
    tmp_path: Path, make: Callable[[Path], None], says: str
) -> None:
    # Prepare
    path = tmp_path / "x.png"
    make(path)

    # Execute
    with pytest.raises(ImageError, match=says) as raised:
        GREY.decode(path)

    # Assert
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    # Prepare: opening a FIFO for reading blocks until a writer comes, unless opened non-blocking
    path = tmp_path / "x.png"
    os.mkfifo(path)
    errors: list[BaseException] = []

    def decode() -> None:
        try:
            GREY.decode(path)
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    # Execute: on a thread, so a hang fails the test instead of stopping the suite
    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(5.0)

    # Assert
    assert not worker.is_alive(), "decoding a FIFO blocked"
    assert len(errors) == 1
    assert isinstance(errors[0], ImageError)
    assert f"{path} is not a regular file" in str(errors[0])


def test_an_oversized_file_is_refused_before_it_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    path = save(tmp_path / "x.png", grey(0))
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10)

    # Execute
    with pytest.raises(ImageError, match="more than 10") as raised:
        GREY.decode(path)

    # Assert
    assert str(path) in str(raised.value)


def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    path = save(tmp_path / "x.png", grey(0))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", HEIGHT * WIDTH - 1)

    # Execute
    with pytest.raises(ImageError, match=f"{WIDTH}×{HEIGHT} is more than") as raised:
        GREY.decode(path)

    # Assert
    assert str(path) in str(raised.value)


# The directory source ----------------------------------------------------------------------------


def test_a_directory_source_takes_npy_and_image_files_in_name_order_and_sets_bad_images_aside(
    tmp_path: Path,
) -> None:
    # Prepare
    np.save(tmp_path / "001.npy", np.zeros((1, HEIGHT, WIDTH), np.float32))
    save(tmp_path / "002.png", grey(20))
    corrupt(tmp_path / "003.png")
    save(tmp_path / "004.jpg", np.full((HEIGHT * 2, WIDTH * 2), 100, np.uint8))
    (tmp_path / "005.txt").write_text("not an input")
    source = DirectorySource(tmp_path, (1, HEIGHT, WIDTH), GREY)

    # Execute
    taken = [source.next() for _ in range(4)]

    # Assert
    assert taken[3] is None
    first, second, third = (s.input for s in taken[:3] if s is not None)
    np.testing.assert_array_equal(first, np.zeros((1, HEIGHT, WIDTH)))
    np.testing.assert_array_equal(second[0], grey(20).astype(np.float32) / np.float32(255.0))
    assert third.shape == (1, HEIGHT, WIDTH)
    np.testing.assert_allclose(third, 100 / 255.0, atol=2 / 255.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["005.txt", "rejected"]
    assert [p.name for p in (tmp_path / "rejected").iterdir()] == ["003.png"]


def test_a_directory_source_without_an_image_input_leaves_image_files_alone(tmp_path: Path) -> None:
    # Prepare
    save(tmp_path / "001.png", grey(0))
    np.save(tmp_path / "002.npy", np.ones((1, HEIGHT, WIDTH), np.float32))
    source = DirectorySource(tmp_path, (1, HEIGHT, WIDTH))

    # Execute
    taken = [source.next() for _ in range(2)]

    # Assert
    assert taken[0] is not None
    np.testing.assert_array_equal(taken[0].input, np.ones((1, HEIGHT, WIDTH)))
    assert taken[1] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["001.png"]


# The feedback store ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    """A feedback store for a model of 3-channel HEIGHT×WIDTH images and 3 classes."""
    with FeedbackStore(tmp_path / "feedback", input_shape=(3, HEIGHT, WIDTH), num_classes=3) as opened:
        yield opened


def test_add_file_stores_the_decoded_image(store: FeedbackStore, tmp_path: Path) -> None:
    # Prepare
    path = save(tmp_path / "x.png", rgb(4, height=8, width=10))

    # Execute
    count = store.add_file(path, 2, COLOUR)

    # Assert
    inputs, labels = store.samples()
    assert count == 1
    assert inputs.shape == (1, 3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(inputs[0], COLOUR.decode(path))
    assert labels.tolist() == [2]


def test_add_file_of_an_image_for_a_model_that_takes_no_images_is_refused(
    store: FeedbackStore, tmp_path: Path
) -> None:
    # Prepare
    path = save(tmp_path / "x.png", rgb(0))

    # Execute
    with pytest.raises(FeedbackError, match="does not take images") as raised:
        store.add_file(path, 1)

    # Assert
    assert str(path) in str(raised.value)
    assert store.count() == 0


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(corrupt, "is not a readable image", id="corrupt"),
        pytest.param(directory, "is not a regular file", id="directory"),
    ],
)
def test_add_file_of_a_bad_image_is_a_feedback_error_naming_it(
    store: FeedbackStore, tmp_path: Path, make: Callable[[Path], None], says: str
) -> None:
    # Prepare
    path = tmp_path / "x.jpeg"
    make(path)

    # Execute
    with pytest.raises(FeedbackError, match=says) as raised:
        store.add_file(path, 1, COLOUR)

    # Assert
    assert str(path) in str(raised.value)
    assert store.count() == 0


# No torch ----------------------------------------------------------------------------------------


def test_decoding_images_loads_neither_torch_nor_the_cloud(tmp_path: Path) -> None:
    # Prepare: tests/device/test_no_torch.py imports the daemon with torch blocked; this decodes an image
    # with torch installed and importable, and looks at what got loaded
    save(tmp_path / "x.png", rgb(0))
    child = (
        "import sys\n"
        "from pathlib import Path\n"
        "import device_firmware_py.images, device_firmware_py.sources\n"
        "from device_firmware_py.images import ImageInput\n"
        "from device_firmware_py.sources import DirectorySource\n"
        "source = DirectorySource(Path(sys.argv[1]), (3, 4, 5), ImageInput(3, 4, 5, 255.0))\n"
        "assert source.next() is not None\n"
        "assert 'torch' not in sys.modules\n"
        "assert not any(m == 'cloud' or m.startswith('cloud.') for m in sys.modules)\n"
        "print('decoded')\n"
    )

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "decoded"
