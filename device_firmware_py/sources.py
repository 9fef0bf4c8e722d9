"""Where the daemon's inputs come from: a simulated stream replaying a scenario user's samples, or a
directory where a camera (or any app) drops `.npy` inputs, or image files (PNG, JPEG) for a model that
takes images. Both validate what they read; a bad input is skipped with a log line, never fed to the
model."""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from device_firmware_py.exceptions import SourceError
from device_firmware_py.files import write_atomically
from device_firmware_py.images import ImageInput, is_image_file

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
MAX_INPUT_FILE_BYTES = 16 * 1024 * 1024
MAX_STREAM_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Sample:
    """One input; `label` is the true class when the source knows it (a simulated user's stream), and
    `held_out` whether the simulated user keeps it for testing (True: measured, never given as
    feedback; False: given as feedback, not measured; None: the stream does not say, both)."""

    input: FloatArray
    label: int | None = None
    held_out: bool | None = None


class InputSource(Protocol):
    """Gives the daemon its next input, or None when none is waiting."""

    def next(self) -> Sample | None: ...


def _check_input(array: npt.NDArray[np.generic], shape: tuple[int, ...], what: str) -> FloatArray:
    if array.shape == (1, *shape):
        array = array[0]
    if array.shape != shape:
        raise SourceError(f"{what} has shape {array.shape}, the model takes {shape}")
    if array.dtype.kind not in "fiu":
        raise SourceError(f"{what} holds {array.dtype}, not numbers")
    out = array.astype(np.float32)
    if not np.isfinite(out).all():
        raise SourceError(f"{what} holds NaN or infinite values")
    return out


class SimulatedSource:
    """Replays a user's stream from an `.npz` file with `inputs` (n, *shape) and `labels` (n,), and
    optionally `held_out` (n,) booleans (the user's test samples), in order, looping, starting at
    `offset` (where the last run stopped, so a restart does not replay what was seen)."""

    def __init__(self, path: Path, input_shape: tuple[int, ...], num_classes: int, offset: int = 0) -> None:
        try:
            if path.stat().st_size > MAX_STREAM_FILE_BYTES:
                raise SourceError(f"{path}: larger than {MAX_STREAM_FILE_BYTES} bytes")
            with np.load(path, allow_pickle=False) as data:
                inputs, labels = np.asarray(data["inputs"]), np.asarray(data["labels"])
                held_out = np.asarray(data["held_out"]) if "held_out" in data.files else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise SourceError(f"{path}: not a stream file with inputs and labels ({exc})") from None
        if len(inputs) == 0 or inputs.shape[1:] != input_shape or labels.shape != (len(inputs),):
            raise SourceError(
                f"{path}: inputs {inputs.shape} and labels {labels.shape} do not fit the model's input "
                f"{input_shape}"
            )
        if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes:
            raise SourceError(f"{path}: labels must be integers in [0, {num_classes})")
        if inputs.dtype.kind not in "fiu" or not np.isfinite(inputs).all():
            raise SourceError(f"{path}: inputs must be finite numbers")
        if held_out is not None and (held_out.dtype != np.bool_ or held_out.shape != labels.shape):
            raise SourceError(f"{path}: held_out must be {len(labels)} booleans, one per input")
        self.held_out = held_out
        self.inputs = inputs.astype(np.float32)
        self.labels = labels.astype(np.int64)
        self.position = offset % len(self.inputs)

    def next(self) -> Sample:
        n = self.position
        self.position = (n + 1) % len(self.inputs)
        held_out = None if self.held_out is None else bool(self.held_out[n])
        return Sample(self.inputs[n], int(self.labels[n]), held_out)


class DirectorySource:
    """Takes the `.npy` files (and, with `image`, the PNG and JPEG files) dropped into a directory,
    first name first, and removes each once read; a file that is not a valid input is moved to
    `rejected/` beside them (kept for the owner to see)."""

    def __init__(
        self, directory: Path, input_shape: tuple[int, ...], image: ImageInput | None = None
    ) -> None:
        if not directory.is_dir():
            raise SourceError(f"{directory}: not a directory")
        self.directory = directory
        self.input_shape = input_shape
        self.image = image
        self._waiting: Iterator[Path] = iter(())

    def next(self) -> Sample | None:
        for path in self._waiting:
            sample = self._read(path)
            if sample is not None:
                return sample
        self._waiting = iter(sorted(p for p in self.directory.iterdir() if self._takes(p)))
        for path in self._waiting:
            sample = self._read(path)
            if sample is not None:
                return sample
        return None

    def _takes(self, path: Path) -> bool:
        return path.suffix == ".npy" or (self.image is not None and is_image_file(path))

    def _read(self, path: Path) -> Sample | None:
        try:
            if path.stat().st_size > MAX_INPUT_FILE_BYTES:
                raise SourceError(f"larger than {MAX_INPUT_FILE_BYTES} bytes")
            if self.image is not None and is_image_file(path):
                array = self.image.decode(path)
            else:
                array = np.load(path, allow_pickle=False)
            sample = Sample(_check_input(np.asarray(array), self.input_shape, "the input"))
        except FileNotFoundError:
            return None  # taken away meanwhile
        except (OSError, ValueError, SourceError) as exc:  # ImageError is a ValueError
            log.warning("input %s rejected: %s", path.name, exc)
            rejected = self.directory / "rejected"
            try:
                rejected.mkdir(exist_ok=True)
                path.replace(rejected / path.name)
            except OSError as move_error:
                log.error("could not move %s aside: %s", path.name, move_error)
            return None
        try:
            path.unlink()
        except OSError as exc:
            log.error("could not remove input %s: %s", path.name, exc)
        return sample


def save_position(path: Path, consumed: int) -> None:
    """How far a simulated stream has been read, so a restart goes on from there (and labels nothing
    twice)."""
    write_atomically(path, json.dumps({"consumed": consumed}).encode())


def load_position(path: Path) -> int:
    """The position `save_position` kept; 0 when there is none or it cannot be read."""
    try:
        consumed = json.loads(path.read_bytes())["consumed"]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("stream position %s unreadable (%s): starting the stream over", path, exc)
        return 0
    return consumed if isinstance(consumed, int) and consumed >= 0 else 0
