"""An owner-only SQLite file of one purpose, behind one locked connection (the spool, the feedback store).

The file is created 0600 (a missing directory 0700) and opened in WAL mode with `synchronous=FULL`, so
a write that returned has been fsynced. A new file gets the subclass's schema, application id and schema
version; any other file must carry the same application id and pass the subclass's check, or opening
fails with an error naming the file, and the file is left as it was.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from device_firmware_py.exceptions import DeviceError

log = logging.getLogger(__name__)


def make_private_dir(directory: Path) -> None:
    """Create `directory` (and missing parents) and make it readable by its owner only (0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)


def create_private_file(path: Path) -> None:
    """Create `path` (and a missing parent, 0700) readable by its owner only; tighten it if it exists."""
    if not path.parent.exists():
        make_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class PrivateSQLiteFile:
    """One SQLite connection to an owner-only file, behind a lock; a subclass says what the file is for.

    A subclass sets the class variables below, creates its tables in `_create` and recognises its own
    file in `_check`. Every failure raises `_error` naming the file; after `close()` (fine twice) too.
    """

    _kind: ClassVar[str]  # how messages name the file: "spool", "feedback store"
    _error: ClassVar[type[DeviceError]]
    _application_id: ClassVar[int]  # written into the SQLite header, tells the file from any other
    _schema_version: ClassVar[int]
    _owns_directory: ClassVar[bool] = False  # True: the directory is made 0700 even if it existed
    _not_ours: ClassVar[str]  # message for another SQLite database; `{path}` is replaced
    _unreadable: ClassVar[str]  # message for a corrupt or non-SQLite file; `{path}`, `{exc}` replaced

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            if self._owns_directory:
                make_private_dir(path.parent)
            create_private_file(path)
        except OSError as exc:
            raise self._error(f"{self._kind} {path} cannot be created: {exc}") from None
        self._conn: sqlite3.Connection | None = self._open()

    def _create(self, conn: sqlite3.Connection) -> None:
        """Create the schema of a new file (inside the creating transaction)."""
        raise NotImplementedError

    def _check(self, conn: sqlite3.Connection, version: int) -> None:
        """Raise `_error` unless the file, at schema `version`, is one this object can use."""
        raise NotImplementedError

    def _open(self) -> sqlite3.Connection:
        """Connect, check that the file is ours (or empty), and create the schema if it is new."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and tables == 0:
                conn.execute("BEGIN IMMEDIATE")
                self._create(conn)
                conn.execute(f"PRAGMA application_id={self._application_id}")
                conn.execute(f"PRAGMA user_version={self._schema_version}")
                conn.execute("COMMIT")
            elif app_id != self._application_id:
                raise self._error(self._not_ours.format(path=self.path))
            self._check(conn, conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(self._unreadable.format(path=self.path, exc=exc)) from None
        except self._error:
            conn.close()
            raise
        return conn

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock; SQLite errors (disk full, I/O) become `_error`."""
        with self._lock:
            if self._conn is None:
                raise self._error(f"{self._kind} {self.path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise self._error(f"{self._kind} {self.path}: {exc}") from None
            finally:
                # Whatever interrupted a transaction, leave the connection usable for the next call.
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        log.exception("%s %s: rollback failed", self._kind, self.path)

    def close(self) -> None:
        """Close the database; later calls raise `_error`. Closing twice is fine."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
