"""The daemon's input sources: a simulated user's stream and a directory of `.npy` inputs, each
refusing what is not an input for the model."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from device_firmware_py.exceptions import SourceError
from device_firmware_py.link import BACKOFF_MAX_S, backoff_delay
from device_firmware_py.sources import DirectorySource, SimulatedSource, load_position, save_position

SHAPE = (8, 8, 1)


def test_a_simulated_stream_replays_in_order_from_an_offset_and_loops(tmp_path: Path) -> None:
    # Prepare
    inputs = np.arange(3 * 64, dtype=np.float32).reshape(3, *SHAPE)
    path = tmp_path / "stream.npz"
    np.savez(path, inputs=inputs, labels=np.array([4, 5, 6]))

    # Execute
    source = SimulatedSource(path, SHAPE, num_classes=10, offset=2)
    samples = [source.next() for _ in range(4)]

    # Assert
    assert [s.label for s in samples] == [6, 4, 5, 6]
    assert np.array_equal(samples[1].input, inputs[0])
    assert {s.held_out for s in samples} == {None}  # the stream does not say which are test samples


def test_a_simulated_stream_says_which_samples_the_user_holds_out(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "stream.npz"
    held_out = np.array([False, True, True])
    np.savez(path, inputs=np.zeros((3, *SHAPE), np.float32), labels=np.array([4, 5, 6]), held_out=held_out)

    # Execute
    source = SimulatedSource(path, SHAPE, num_classes=10)

    # Assert
    assert [source.next().held_out for _ in range(4)] == [False, True, True, False]


@pytest.mark.parametrize(
    ("arrays", "says"),
    [
        ({"inputs": np.zeros((3, 8, 8, 1))}, "inputs and labels"),
        ({"inputs": np.zeros((3, 4, 4, 1)), "labels": np.zeros(3, int)}, "do not fit"),
        ({"inputs": np.zeros((3, *SHAPE)), "labels": np.array([0, 1, 10])}, r"\[0, 10\)"),
        ({"inputs": np.full((2, *SHAPE), np.nan), "labels": np.zeros(2, int)}, "finite"),
        ({"inputs": np.zeros((0, *SHAPE)), "labels": np.zeros(0, int)}, "do not fit"),
        ({"inputs": np.zeros((2, *SHAPE)), "labels": np.zeros(2, int), "held_out": np.ones(2)}, "booleans"),
        (
            {"inputs": np.zeros((2, *SHAPE)), "labels": np.zeros(2, int), "held_out": np.ones(3, bool)},
            "booleans",
        ),
    ],
)
def test_a_bad_stream_file_is_refused(tmp_path: Path, arrays: dict[str, np.ndarray], says: str) -> None:
    # Prepare
    path = tmp_path / "stream.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]

    # Execute / Assert
    with pytest.raises(SourceError, match=says):
        SimulatedSource(path, SHAPE, num_classes=10)


def test_a_file_that_is_not_a_stream_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "stream.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")

    # Execute / Assert
    with pytest.raises(SourceError, match="not a stream file"):
        SimulatedSource(path, SHAPE, num_classes=10)


def test_a_directory_source_takes_inputs_in_name_order_and_sets_bad_ones_aside(tmp_path: Path) -> None:
    # Prepare: two good inputs (one with a batch dimension of 1), and three that are not inputs
    np.save(tmp_path / "002.npy", np.ones((1, *SHAPE), np.float32))
    np.save(tmp_path / "001.npy", np.zeros(SHAPE, np.uint8))
    np.save(tmp_path / "003.npy", np.zeros((4, 4)))
    np.save(tmp_path / "004.npy", np.full(SHAPE, np.inf))
    (tmp_path / "005.npy").write_bytes(b"\x93NUMPY garbage")
    source = DirectorySource(tmp_path, SHAPE)

    # Execute
    taken = [source.next() for _ in range(3)]

    # Assert: the good ones in order, consumed; the bad ones kept aside for the owner to look at
    assert taken[2] is None
    assert [float(s.input.max()) for s in taken[:2] if s is not None] == [0.0, 1.0]
    assert list(tmp_path.glob("*.npy")) == []
    assert sorted(p.name for p in (tmp_path / "rejected").iterdir()) == ["003.npy", "004.npy", "005.npy"]


def test_a_directory_source_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a directory"):
        DirectorySource(tmp_path / "missing", SHAPE)


def test_reconnect_back_off_doubles_to_a_minute_with_jitter() -> None:
    # Prepare
    rng = random.Random(7)  # noqa: S311 (jitter, not a secret)

    # Execute
    delays = [backoff_delay(attempt, rng) for attempt in range(10)]
    many = {round(backoff_delay(3, rng), 3) for _ in range(50)}

    # Assert: within [half, all] of 1, 2, 4, ... 60 s; drawn, so a fleet does not come back in one wave
    for attempt, delay in enumerate(delays):
        ceiling = min(BACKOFF_MAX_S, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert len(many) > 40


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, 0),
        (b'{"consumed": 12}', 12),
        (b"garbage", 0),
        (b'{"consumed": -3}', 0),
        (b'{"consumed": "7"}', 0),
        (b"[]", 0),
    ],
)
def test_a_stream_position_reads_back_or_starts_over(
    tmp_path: Path, content: bytes | None, expected: int
) -> None:
    path = tmp_path / "stream-position.json"
    if content is not None:
        path.write_bytes(content)

    assert load_position(path) == expected


def test_a_saved_stream_position_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "stream-position.json"

    save_position(path, 41)

    assert load_position(path) == 41
