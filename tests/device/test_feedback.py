"""device_firmware_py.feedback: the private store (validation, files, marks, privacy) and its Unix socket."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_firmware_py.exceptions import FeedbackError, FeedbackFullError, FeedbackStoreError
from device_firmware_py.feedback import DB_NAME, FeedbackServer, FeedbackStore

SHAPE = (4, 3)
CLASSES = 5


def sample(value: float = 1.0) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A valid sample of SHAPE whose first element is `value`, the rest counting up."""
    x = np.arange(12, dtype=np.float32).reshape(SHAPE)
    x[0, 0] = value
    return x


def open_store(directory: Path, **kwargs: Any) -> FeedbackStore:
    """A store for SHAPE and CLASSES (overridable)."""
    options: dict[str, Any] = {"input_shape": SHAPE, "num_classes": CLASSES} | kwargs
    return FeedbackStore(directory, **options)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    with open_store(tmp_path / "feedback") as opened:
        yield opened


# The store ---------------------------------------------------------------------------------------


def test_add_stores_samples_and_returns_the_count(store: FeedbackStore) -> None:
    # Prepare
    first, second = sample(0.5), sample(-2.0)[np.newaxis]  # a leading batch dim of 1 is fine

    # Execute
    counts = [store.add(first, 3), store.add(second, np.int64(0))]

    # Assert
    inputs, labels = store.samples()
    assert counts == [1, 2]
    assert store.count() == 2
    assert inputs.dtype == np.float32 and inputs.shape == (2, *SHAPE)
    assert labels.dtype == np.int64 and labels.tolist() == [3, 0]
    np.testing.assert_array_equal(inputs[0], first)
    np.testing.assert_array_equal(inputs[1], second[0])


def test_integer_samples_are_stored_as_float32(store: FeedbackStore) -> None:
    # Execute
    store.add(np.arange(12, dtype=np.int16).reshape(SHAPE), 1)

    # Assert
    inputs, _ = store.samples()
    np.testing.assert_array_equal(inputs[0], np.arange(12, dtype=np.float32).reshape(SHAPE))


def test_an_empty_store_returns_empty_arrays_of_the_right_shape(store: FeedbackStore) -> None:
    # Execute
    inputs, labels = store.samples()

    # Assert
    assert inputs.shape == (0, *SHAPE) and inputs.dtype == np.float32
    assert labels.shape == (0,) and labels.dtype == np.int64
    assert store.last_id() == 0


@pytest.mark.parametrize(
    ("bad_sample", "label", "message"),
    [
        (np.ones((3, 4)), 1, "shape"),
        (np.ones((2, 4, 3)), 1, "shape"),
        (np.ones(12), 1, "shape"),
        (np.full(SHAPE, np.nan), 1, "NaN"),
        (np.full(SHAPE, np.inf), 1, "NaN or infinite"),
        (np.full(SHAPE, 1e300), 1, "beyond float32"),
        (np.full(SHAPE, "1.0"), 1, "dtype"),
        (np.ones(SHAPE, dtype=bool), 1, "dtype"),
        (np.ones(SHAPE, dtype=complex), 1, "dtype"),
        ([[1, 2, 3], [4, 5]], 1, "numeric"),
        (sample(), -1, r"\[0, 5\)"),
        (sample(), 5, r"\[0, 5\)"),
        (sample(), True, "integer"),
        (sample(), 1.0, "integer"),
        (sample(), "1", "integer"),
    ],
)
def test_a_sample_or_label_that_does_not_fit_is_refused(
    store: FeedbackStore, bad_sample: Any, label: Any, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(FeedbackError, match=message):
        store.add(bad_sample, label)
    assert store.count() == 0


def test_a_full_store_refuses_more_samples(tmp_path: Path) -> None:
    # Prepare
    with open_store(tmp_path / "feedback", max_samples=3) as store:
        for label in range(3):
            store.add(sample(), label)

        # Execute / Assert
        with pytest.raises(FeedbackFullError, match="3 samples"):
            store.add(sample(), 0)
        assert store.count() == 3


def test_labelled_since_counts_samples_after_a_mark(store: FeedbackStore) -> None:
    # Prepare
    store.add(sample(), 1)
    store.add(sample(), 2)
    mark = store.last_id()

    # Execute
    for label in range(3):
        store.add(sample(), label)

    # Assert
    assert mark == 2
    assert store.labelled_since(mark) == 3
    assert store.labelled_since(store.last_id()) == 0
    assert store.labelled_since(0) == 5


def test_samples_marks_and_ids_survive_reopening(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "feedback"
    with open_store(directory) as store:
        store.add(sample(7.0), 4)
        store.add(sample(8.0), 2)
        mark = store.last_id()

    # Execute
    with open_store(directory, num_classes=CLASSES + 2) as reopened:  # more classes are fine
        count = reopened.add(sample(9.0), 6)
        inputs, labels = reopened.samples()
        since = reopened.labelled_since(mark)

    # Assert
    assert count == 3
    assert inputs[:, 0, 0].tolist() == [7.0, 8.0, 9.0]
    assert labels.tolist() == [4, 2, 6]
    assert since == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [({"input_shape": (3, 4)}, "shape"), ({"num_classes": 3}, "labels beyond 3 classes")],
)
def test_reopening_for_another_model_is_refused(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    # Prepare
    directory = tmp_path / "feedback"
    with open_store(directory) as store:
        store.add(sample(), 4)

    # Execute / Assert
    with pytest.raises(FeedbackStoreError, match=message):
        open_store(directory, **options)


def test_a_corrupt_store_file_raises_naming_it_and_is_left_alone(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "feedback"
    directory.mkdir()
    garbage = os.urandom(4096)
    (directory / DB_NAME).write_bytes(garbage)

    # Execute
    with pytest.raises(FeedbackStoreError) as raised:
        open_store(directory)

    # Assert
    assert str(directory / DB_NAME) in str(raised.value)
    assert (directory / DB_NAME).read_bytes() == garbage


def test_the_store_directory_and_files_are_private(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "feedback"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)

    # Execute
    with open_store(directory) as store:
        store.add(sample(), 1)
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in directory.iterdir()}

    # Assert
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert DB_NAME in modes
    assert set(modes.values()) == {0o600}


def test_sample_values_and_labels_are_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    caplog.set_level(logging.DEBUG, logger="device_firmware_py.feedback")
    secret = 31337.25

    # Execute
    with open_store(tmp_path / "feedback", num_classes=1000) as store:
        store.add(sample(secret), 987)
        with pytest.raises(FeedbackError):
            store.add(sample(secret)[:2], 987)

    # Assert
    assert caplog.records  # counts are logged
    assert "31337" not in caplog.text
    assert "987" not in caplog.text


# Files -------------------------------------------------------------------------------------------


def test_add_file_stores_a_npy_sample(store: FeedbackStore, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "x.npy"
    np.save(path, sample(3.5).astype(np.float64)[np.newaxis])

    # Execute
    count = store.add_file(path, 2)

    # Assert
    inputs, labels = store.samples()
    assert count == 1
    np.testing.assert_array_equal(inputs[0], sample(3.5))
    assert labels.tolist() == [2]


def write_pickled_npy(path: Path) -> None:
    """A .npy of object dtype, which only loads by unpickling."""
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b"label,value\n1,2\n"), "not a .npy file"),
        (lambda p: p.write_bytes(pickle.dumps(sample())), "not a .npy file"),
        (write_pickled_npy, "not a readable .npy"),
        (lambda p: np.save(p, np.ones((3, 4))), "shape"),
        (lambda p: np.save(p, np.full(SHAPE, np.nan)), "NaN"),
        (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00garbage"), "not a readable .npy"),
        (lambda p: p.write_bytes(open_npy_bytes()[:-8]), "not a readable .npy"),  # truncated
        (lambda p: np.save(p, np.ones((1000, 1000))), "more than a sample needs"),
    ],
    ids=["csv", "raw-pickle", "object-npy", "wrong-shape", "nan", "bad-header", "truncated", "oversized"],
)
def test_add_file_refuses_a_bad_file_with_a_clear_error(
    store: FeedbackStore, tmp_path: Path, write: Any, message: str
) -> None:
    # Prepare
    path = tmp_path / "x.npy"
    write(path)

    # Execute / Assert
    with pytest.raises(FeedbackError, match=message) as raised:
        store.add_file(path, 1)
    assert str(path) in str(raised.value)
    assert store.count() == 0


def open_npy_bytes() -> bytes:
    """The bytes of a valid .npy sample."""
    buffer = io.BytesIO()
    np.save(buffer, sample())
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo"])
def test_add_file_refuses_what_is_not_a_regular_file(store: FeedbackStore, tmp_path: Path, kind: str) -> None:
    # Prepare
    path = tmp_path / "x.npy"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading a FIFO with no writer would hang

    # Execute / Assert
    with pytest.raises(FeedbackError, match=str(path)):
        store.add_file(path, 1)


# The socket server -------------------------------------------------------------------------------


def ask(socket_path: Path, data: bytes, *, timeout: float = 10.0) -> dict[str, Any]:
    """Send `data` on one connection and return the server's JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(socket_path))
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before reading everything (oversized)
        answer = client.makefile("rb").readline()  # one line; the server may reset the rest
    parsed: dict[str, Any] = json.loads(answer)
    return parsed


def request(label: Any, values: Any) -> bytes:
    """One request line."""
    return json.dumps({"label": label, "input": values}).encode() + b"\n"


@pytest.fixture
def server(short_dir: Path, store: FeedbackStore) -> Iterator[FeedbackServer]:
    running = FeedbackServer(short_dir / "fb.sock", store, timeout=0.5)
    running.start()
    yield running
    running.stop()


def test_a_request_adds_a_sample(server: FeedbackServer, store: FeedbackStore) -> None:
    # Execute
    first = ask(server.socket_path, request(3, sample(2.5).tolist()))
    second = ask(server.socket_path, request(1, [sample().tolist()]))  # with a batch dim of 1

    # Assert
    assert first == {"ok": True, "count": 1}
    assert second == {"ok": True, "count": 2}
    inputs, labels = store.samples()
    np.testing.assert_array_equal(inputs[0], sample(2.5))
    assert labels.tolist() == [3, 1]


def test_a_request_ended_by_eof_without_a_newline_is_accepted(server: FeedbackServer) -> None:
    # Execute
    answer = ask(server.socket_path, request(0, sample().tolist()).rstrip(b"\n"))

    # Assert
    assert answer == {"ok": True, "count": 1}


GOOD = sample().tolist()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json\n", "not a JSON object"),
        (b"\xff\xfe\n", "not a JSON object"),
        (b"\n", "empty"),
        (b"[1, 2]\n", "exactly"),
        (json.dumps({"label": 1}).encode() + b"\n", "exactly"),
        (json.dumps({"label": 1, "input": GOOD, "extra": 1}).encode() + b"\n", "exactly"),
        (request("1", GOOD), "integer"),
        (request(True, GOOD), "integer"),
        (request(9, GOOD), r"\[0, 5\)"),
        (request(1, "1,2,3"), "nested list"),
        (request(1, [["1", "2", "3"]] * 4), "nested list"),
        (request(1, [[1, 2, 3], [4, 5]]), "rectangular"),
        (request(1, [[None] * 3] * 4), "nested list"),
        (request(1, [[10**30] * 3] * 4), "nested list"),
        (request(1, [[1, 2], [3, 4]]), "shape"),
        (b'{"label": 1, "input": [[NaN, 1, 2], [1, 2, 3], [1, 2, 3], [1, 2, 3]]}\n', "NaN"),
        (b'{"label": 1, "input": [[1e999, 1, 2], [1, 2, 3], [1, 2, 3], [1, 2, 3]]}\n', "infinite"),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", "not a JSON object"),
        (b"1" * (1024 * 1024 + 10) + b"\n", "exceeds"),
    ],
    ids=[
        "not-json", "not-utf8", "empty", "not-object", "missing-input", "extra-key", "label-string",
        "label-bool", "label-range", "input-string", "input-strings", "ragged", "nulls", "huge-int",
        "wrong-shape", "nan", "infinity", "deep-nesting", "oversized",
    ],
)  # fmt: skip
def test_garbage_gets_an_error_answer_and_the_server_goes_on(
    server: FeedbackServer, store: FeedbackStore, data: bytes, message: str
) -> None:
    # Execute
    answer = ask(server.socket_path, data)
    after = ask(server.socket_path, request(2, GOOD))

    # Assert
    assert answer["ok"] is False
    assert set(answer) == {"ok", "error"}
    assert re.search(message, answer["error"])
    assert after == {"ok": True, "count": 1}
    assert store.count() == 1


def test_a_slow_client_times_out_without_holding_up_others(short_dir: Path, store: FeedbackStore) -> None:
    # Prepare: a timeout well above what one request takes on a loaded machine (its commit is synced)
    timeout = 3.0
    with FeedbackServer(short_dir / "fb.sock", store, timeout=timeout) as server:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.settimeout(10.0)
        slow.connect(str(server.socket_path))
        slow.sendall(b'{"label": 1, ')  # and then nothing

        # Execute
        started = time.monotonic()
        other = ask(server.socket_path, request(1, GOOD))
        served_in = time.monotonic() - started
        slow_answer = json.loads(slow.makefile("rb").readline())
        slow.close()

    # Assert
    assert other == {"ok": True, "count": 1}
    assert served_in < timeout  # answered before the slow client's timeout: it did not wait for it
    assert slow_answer["ok"] is False
    assert "within" in slow_answer["error"]


def test_many_concurrent_clients_are_all_answered(server: FeedbackServer, store: FeedbackStore) -> None:
    # Prepare
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(label: int) -> None:
        answer = ask(server.socket_path, request(label, GOOD))
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=client, args=(n % CLASSES,)) for n in range(16)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    # Assert: more clients than MAX_CLIENTS: the others waited for a slot
    assert len(answers) == 16
    assert all(a["ok"] for a in answers)
    assert sorted(a["count"] for a in answers) == list(range(1, 17))
    assert store.count() == 16


def test_the_socket_is_private_and_removed_on_stop(short_dir: Path, store: FeedbackStore) -> None:
    # Prepare
    path = short_dir / "fb.sock"
    server = FeedbackServer(path, store)

    # Execute
    server.start()
    mode = os.lstat(path).st_mode
    server.stop()

    # Assert
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert not path.exists()


def test_a_stale_socket_file_is_replaced(short_dir: Path, store: FeedbackStore) -> None:
    # Prepare: a socket file left behind by a daemon that was killed
    path = short_dir / "fb.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()

    # Execute
    with FeedbackServer(path, store):
        answer = ask(path, request(1, GOOD))

    # Assert
    assert answer == {"ok": True, "count": 1}


def test_a_live_servers_socket_is_not_taken_over(server: FeedbackServer, store: FeedbackStore) -> None:
    # Prepare
    second = FeedbackServer(server.socket_path, store)

    # Execute / Assert
    with pytest.raises(FeedbackError, match="another feedback server"):
        second.start()
    assert ask(server.socket_path, request(1, GOOD))["ok"] is True


def test_a_file_that_is_not_a_socket_is_not_removed(short_dir: Path, store: FeedbackStore) -> None:
    # Prepare
    path = short_dir / "fb.sock"
    path.write_text("user data")

    # Execute / Assert
    with pytest.raises(FeedbackError, match="not a socket"):
        FeedbackServer(path, store).start()
    assert path.read_text() == "user data"
