"""The private feedback store: the user's labelled samples, which never leave the device (DESIGN §3.4).

Samples live in an owner-only SQLite file (rows of id, label, float32 blob, added_at) in an
owner-only directory. RD reads them back with `samples()`; `labelled_since` serves policies such as
"run RD after N new labels". An on-device app adds samples through `FeedbackServer`, a Unix socket
(0600) taking one JSON line per connection. Nothing here logs sample values or labels, only counts.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import socket
import sqlite3
import stat
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from device_firmware_py.exceptions import (
    ConfigError,
    FeedbackError,
    FeedbackFullError,
    FeedbackStoreError,
    ImageError,
)
from device_firmware_py.images import ImageInput, is_image_file
from device_firmware_py.sqlite_file import PrivateSQLiteFile

log = logging.getLogger(__name__)

DB_NAME = "feedback.sqlite3"
# Written into the SQLite header ('DRFB') so the store is told apart from any other database.
APPLICATION_ID = 0x44524642
SCHEMA_VERSION = 1
NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_ALLOWANCE = 64 * 1024  # a .npy header is a few hundred bytes; this is generous
MAX_REQUEST_BYTES = 1024 * 1024
REQUEST_TIMEOUT = 5.0
MAX_CLIENTS = 4
LISTEN_BACKLOG = 64  # clients waiting for a slot; a timed-out AF_UNIX connect fails when it is full
UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path holds 108, the final NUL included)


def check_socket_path(path: Path) -> Path:
    """`path` if the feedback socket can be bound there, else ConfigError: said when the daemon
    starts, not when its first model arrives and the server cannot listen."""
    length = len(os.fsencode(path))
    if length > UNIX_PATH_MAX:
        raise ConfigError(
            f"the feedback socket {path} is {length} bytes long; a Unix socket's path may have at most "
            f"{UNIX_PATH_MAX}: give the device a shorter state_dir"
        )
    return path


_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE samples ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"  # AUTOINCREMENT: ids never come back, so marks stay valid
    " label INTEGER NOT NULL,"
    " data BLOB NOT NULL,"
    " added_at REAL NOT NULL)",
)


def as_sample(sample: npt.ArrayLike, input_shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    """`sample` as a float32 array of `input_shape` (a leading batch dim of 1 is dropped); FeedbackError
    if it is not numeric, has another shape or holds NaN or infinity (also after the float32 cast)."""
    try:
        array = np.asarray(sample)
    except (ValueError, TypeError, OverflowError) as exc:
        raise FeedbackError(f"sample is not a numeric array: {exc}") from None
    if array.dtype.kind not in "iuf":
        raise FeedbackError(f"sample must hold integers or floats, not dtype {array.dtype}")
    if array.shape == (1, *input_shape):
        array = array[0]
    if array.shape != input_shape:
        raise FeedbackError(f"sample has shape {array.shape}, the model takes {input_shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        raise FeedbackError("sample holds NaN or infinite values (or values beyond float32)")
    return out


def as_label(label: object, num_classes: int) -> int:
    """`label` as an int in [0, num_classes); FeedbackError otherwise (booleans are not labels)."""
    if isinstance(label, bool | np.bool_) or not isinstance(label, int | np.integer):
        raise FeedbackError(f"label must be an integer, not {type(label).__name__}")
    value = int(label)
    if not 0 <= value < num_classes:
        raise FeedbackError(f"label must be in [0, {num_classes})")
    return value


class FeedbackStore(PrivateSQLiteFile):
    """The user's labelled samples on disk; thread-safe (the socket server adds, the daemon reads)."""

    _kind = "feedback store"
    _error = FeedbackStoreError
    _application_id = APPLICATION_ID
    _schema_version = SCHEMA_VERSION
    _owns_directory = True  # the store's own directory: private even if it existed
    _not_ours = "{path} is an SQLite database but not a feedback store"
    _unreadable = "feedback store {path} is unreadable or corrupt: {exc}"

    def __init__(
        self,
        directory: Path,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        max_samples: int = 10_000,
    ) -> None:
        if not input_shape or any(d <= 0 for d in input_shape):
            raise ValueError(f"input_shape must be non-empty and positive, not {input_shape}")
        if num_classes < 2 or max_samples <= 0:
            raise ValueError("num_classes must be at least 2 and max_samples positive")
        self.directory = directory
        self.path = directory / DB_NAME
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.max_samples = max_samples
        self._sample_bytes = 4 * math.prod(self.input_shape)
        self._shape = json.dumps(list(self.input_shape))
        super().__init__(directory / DB_NAME)
        log.info("feedback store %s: %d samples", self.path, self.count())

    def _create(self, conn: sqlite3.Connection) -> None:
        """The tables, and the input shape the store is made for."""
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('input_shape', ?)", (self._shape,))

    def _check(self, conn: sqlite3.Connection, version: int) -> None:
        """A store of this schema version, made for this input shape, with no label beyond num_classes."""
        if version != SCHEMA_VERSION:
            raise FeedbackStoreError(f"feedback store {self.path} has schema version {version}")
        stored = conn.execute("SELECT value FROM meta WHERE key = 'input_shape'").fetchone()
        if stored is None or stored[0] != self._shape:
            raise FeedbackStoreError(
                f"feedback store {self.path} holds samples of shape {stored and stored[0]}, "
                f"not {self.input_shape}"
            )
        top = conn.execute("SELECT max(label) FROM samples").fetchone()[0]
        if top is not None and top >= self.num_classes:
            raise FeedbackStoreError(
                f"feedback store {self.path} holds labels beyond {self.num_classes} classes"
            )

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of one read query, under the lock, with SQLite errors as FeedbackStoreError."""
        with self._db() as conn:
            return conn.execute(sql, params).fetchall()

    def add(self, sample: npt.ArrayLike, label: int | np.integer[Any]) -> int:
        """Store one labelled sample (durably) and return how many are stored.

        FeedbackError if the sample or label does not fit the model, FeedbackFullError at max_samples.
        """
        data = as_sample(sample, self.input_shape).tobytes()
        value = as_label(label, self.num_classes)
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            count: int = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
            if count >= self.max_samples:
                raise FeedbackFullError(f"the feedback store already holds {count} samples, its maximum")
            conn.execute(
                "INSERT INTO samples (label, data, added_at) VALUES (?, ?, ?)", (value, data, time.time())
            )
            conn.execute("COMMIT")
        log.debug("feedback store: %d samples stored", count + 1)
        return count + 1

    def add_file(self, path: Path, label: int | np.integer[Any], image: ImageInput | None = None) -> int:
        """Store the sample in the `.npy` file at `path` (no pickles; size capped before reading), or
        in the image file (PNG, JPEG) at `path` decoded as `image` says, for a model that takes images."""
        if is_image_file(path):
            if image is None:
                raise FeedbackError(f"{path}: the installed model does not take images; give a .npy input")
            try:
                return self.add(image.decode(path), label)
            except ImageError as exc:
                raise FeedbackError(str(exc)) from None
        limit = NPY_HEADER_ALLOWANCE + 8 * math.prod(self.input_shape)  # float64 is the widest we take
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang us
        except OSError as exc:
            raise FeedbackError(f"cannot open {path}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise FeedbackError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb") as fh:
            if info.st_size > limit:
                raise FeedbackError(f"{path} has {info.st_size} bytes, more than a sample needs ({limit})")
            raw = fh.read(limit + 1)
        if not raw.startswith(NPY_MAGIC):
            raise FeedbackError(f"{path} is not a .npy file")
        try:
            array = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError, TypeError, SyntaxError) as exc:
            raise FeedbackError(f"{path} is not a readable .npy array: {exc}") from None
        try:
            return self.add(array, label)
        except FeedbackFullError:
            raise
        except FeedbackError as exc:
            raise FeedbackError(f"{path}: {exc}") from None

    def samples(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """All samples, oldest first: inputs (n, *input_shape) float32 and labels (n,) int64."""
        rows = self._query("SELECT label, data FROM samples ORDER BY id")
        if any(len(data) != self._sample_bytes for _, data in rows):
            raise FeedbackStoreError(f"feedback store {self.path} holds a sample of the wrong size")
        inputs = np.frombuffer(b"".join(data for _, data in rows), dtype=np.float32)
        labels = np.fromiter((label for label, _ in rows), dtype=np.int64, count=len(rows))
        return inputs.reshape((len(rows), *self.input_shape)).copy(), labels

    def count(self) -> int:
        """How many samples are stored."""
        count: int = self._query("SELECT count(*) FROM samples")[0][0]
        return count

    def last_id(self) -> int:
        """The id of the newest sample (0 when none was ever stored); a mark for `labelled_since`."""
        rows = self._query("SELECT seq FROM sqlite_sequence WHERE name = 'samples'")
        return int(rows[0][0]) if rows else 0

    def labelled_since(self, mark: int) -> int:
        """How many stored samples were added after the sample with id `mark`."""
        count: int = self._query("SELECT count(*) FROM samples WHERE id > ?", (mark,))[0][0]
        return count


def _reject_constant(name: str) -> float:
    """json.loads hook: NaN and Infinity are not valid sample values."""
    raise FeedbackError(f"{name} is not a valid number")


def parse_request(line: bytes) -> tuple[int, npt.NDArray[Any]]:
    """(label, input array) of one request line; FeedbackError if it is not such a request."""
    try:
        request = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if isinstance(exc, FeedbackError):
            raise
        raise FeedbackError("request is not a JSON object on one line") from None
    if not isinstance(request, dict) or set(request) != {"label", "input"}:
        raise FeedbackError('request must be a JSON object with exactly "label" and "input"')
    if not isinstance(request["input"], list):
        raise FeedbackError('"input" must be a nested list of numbers')
    try:
        array = np.asarray(request["input"])
    except (ValueError, TypeError, OverflowError):
        raise FeedbackError('"input" must be a rectangular nested list of numbers') from None
    if array.dtype.kind not in "iuf":
        raise FeedbackError('"input" must be a rectangular nested list of numbers')
    return request["label"], array


class FeedbackServer:
    """A Unix socket (0600) on which an on-device app adds labelled samples to a FeedbackStore.

    One request per connection: a JSON line `{"label": int, "input": [[...]]}` of at most
    MAX_REQUEST_BYTES, answered `{"ok": true, "count": n}` or `{"ok": false, "error": "..."}`. Each
    connection is served on its own thread within `timeout` seconds, at most MAX_CLIENTS at once.
    """

    def __init__(
        self,
        socket_path: Path,
        store: FeedbackStore,
        *,
        timeout: float = REQUEST_TIMEOUT,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.socket_path = socket_path
        self.store = store
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[threading.Thread] = set()
        self._clients_lock = threading.Lock()

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve on a background thread."""
        if self._thread is not None:
            raise RuntimeError("feedback server already started")
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # On Linux the socket file takes the socket inode's mode at bind: no window where it is 0755.
            os.fchmod(listener.fileno(), 0o600)
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            listener.listen(LISTEN_BACKLOG)
            listener.settimeout(0.2)  # how often the accept loop looks at the stop flag
        except OSError as exc:
            listener.close()
            raise FeedbackError(f"cannot listen on {self.socket_path}: {exc}") from None
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._serve, args=(listener,), name="feedback-server", daemon=True
        )
        self._thread.start()
        log.info("feedback server listening on %s", self.socket_path)

    def _remove_stale_socket(self) -> None:
        """Unlink a socket file nobody listens on; refuse a live server's socket or any other file."""
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FeedbackError(f"{self.socket_path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise FeedbackError(f"cannot check {self.socket_path}: {exc}") from None
        else:
            raise FeedbackError(f"another feedback server is listening on {self.socket_path}")
        finally:
            probe.close()
        self.socket_path.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (each within the timeout), remove the socket."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            client.join(self.timeout + 1.0)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.socket_path.unlink(missing_ok=True)
        log.info("feedback server stopped")

    def __enter__(self) -> FeedbackServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self, listener: socket.socket) -> None:
        """Accept connections until stopped, one thread each; with MAX_CLIENTS busy, later clients wait
        in the listen backlog (a slow client holds its slot for the timeout at most)."""
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=0.2):
                continue
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                self._slots.release()
                continue
            except OSError:
                self._slots.release()
                log.exception("feedback server: accept failed")
                time.sleep(0.2)
                continue
            conn.settimeout(self.timeout)
            client = threading.Thread(target=self._handle, args=(conn,), name="feedback-client", daemon=True)
            with self._clients_lock:
                self._clients.add(client)
            client.start()

    def _handle(self, conn: socket.socket) -> None:
        """Serve one connection: read its line, store the sample, answer; never raise."""
        try:
            with conn:
                try:
                    label, array = parse_request(self._read_line(conn))
                    answer: dict[str, Any] = {"ok": True, "count": self.store.add(array, label)}
                except FeedbackError as exc:
                    log.info("feedback server: request refused: %s", exc)
                    answer = {"ok": False, "error": str(exc)}
                except Exception:
                    log.exception("feedback server: request failed")
                    answer = {"ok": False, "error": "internal error, see the device log"}
                self._answer(conn, answer)
        finally:
            self._slots.release()
            with self._clients_lock:
                self._clients.discard(threading.current_thread())

    def _read_line(self, conn: socket.socket) -> bytes:
        """The request line (up to a newline or EOF) within the size limit and the overall timeout."""
        deadline = time.monotonic() + self.timeout
        buffer = bytearray()
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FeedbackError(f"request not received within {self.timeout} s")
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                raise FeedbackError(f"request not received within {self.timeout} s") from None
            if not chunk:
                break
            buffer += chunk
            if len(buffer.partition(b"\n")[0]) > self.max_request_bytes:
                raise FeedbackError(f"request exceeds {self.max_request_bytes} bytes")
        line = bytes(buffer.partition(b"\n")[0])
        if not line.strip():
            raise FeedbackError("empty request")
        return line

    @staticmethod
    def _answer(conn: socket.socket, answer: dict[str, Any]) -> None:
        """Send one JSON line; a client that went away is not our problem."""
        try:
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            log.debug("feedback server: client left before its answer")
