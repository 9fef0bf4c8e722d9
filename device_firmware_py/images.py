"""Image files as model inputs: what a camera (or an app) saves becomes the C×H×W tensor the model takes.

A model takes images when its manifest has `pixel_scale`: its input is B×C×H×W, channels first, of
pixel values divided by pixel_scale. A file is decoded with Pillow, converted to the model's channels
(grey or RGB), resized to its H×W and scaled, as the cloud's data sources did with its training images.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from device_firmware_py.exceptions import ImageError
from wire import ArtifactManifest

FloatArray = npt.NDArray[np.float32]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # checked before decoding: a larger file is a decompression bomb


def is_image_file(path: Path) -> bool:
    """Whether the file's name says it is an image the device decodes."""
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageInput:
    """The image a model takes: its channels (1 grey, 3 RGB), height, width and pixel scale."""

    channels: int
    height: int
    width: int
    pixel_scale: float

    @classmethod
    def of(cls, manifest: ArtifactManifest) -> ImageInput | None:
        """The model's image input, or None if it does not take images (the manifest checked the shape)."""
        if manifest.pixel_scale is None:
            return None
        _, c, h, w = manifest.input.shape
        return cls(c, h, w, manifest.pixel_scale)

    def decode(self, path: Path) -> FloatArray:
        """The model's input for the image file at `path`; ImageError naming the file."""
        from PIL import Image, UnidentifiedImageError

        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang us
        except OSError as exc:
            raise ImageError(f"cannot open {path}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_IMAGE_BYTES:
            os.close(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(f"{path} is not a regular file")
            raise ImageError(f"{path} has {info.st_size} bytes, more than {MAX_IMAGE_BYTES}")
        with os.fdopen(fd, "rb") as fh:
            try:
                with Image.open(fh, formats=IMAGE_FORMATS) as image:
                    if image.width * image.height > MAX_IMAGE_PIXELS:
                        raise ImageError(
                            f"{path}: {image.width}×{image.height} is more than {MAX_IMAGE_PIXELS} pixels"
                        )
                    converted = image.convert("L" if self.channels == 1 else "RGB")
                    if converted.size != (self.width, self.height):
                        converted = converted.resize((self.width, self.height), Image.Resampling.BILINEAR)
                    pixels = np.asarray(converted, dtype=np.float32)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
                raise ImageError(f"{path} is not a readable image: {exc}") from None
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out: FloatArray = np.ascontiguousarray(chw / np.float32(self.pixel_scale), dtype=np.float32)
        return out
