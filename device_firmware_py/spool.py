"""The device's on-disk spool: knowledge reports and model acks kept until the cloud's receipt (DESIGN §2).

A broker's PUBACK only covers device → broker, so every message that must reach the cloud is written
here first and removed only when the matching `receipt` arrives; until then it is sent again after a
timeout, and everything goes again, in order, after a reconnect. SQLite in WAL mode with
`synchronous=FULL`: an `add` that returned has been fsynced and survives SIGKILL and power loss.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from device_firmware_py.exceptions import SpoolError, SpoolFullError
from device_firmware_py.sqlite_file import PrivateSQLiteFile
from device_firmware_py.sqlite_file import create_private_file as create_private_file  # was defined here

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Written into the SQLite header ('DRSP') so a spool is told apart from any other database.
APPLICATION_ID = 0x44525350
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    size INTEGER NOT NULL,
    added_at REAL NOT NULL,
    last_sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
)
"""
_COLUMNS = ["seq", "msg_id", "topic", "size", "added_at", "last_sent_at", "attempts", "payload"]


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """One message waiting for its receipt."""

    msg_id: str
    topic: str
    payload: bytes
    added_at: float
    last_sent_at: float | None
    attempts: int


def normalize_msg_id(msg_id: str | uuid.UUID) -> str:
    """The canonical text of a UUID msg_id, so a receipt's `ack_of` matches however it was spelled."""
    try:
        return str(msg_id if isinstance(msg_id, uuid.UUID) else uuid.UUID(msg_id))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"msg_id {msg_id!r} is not a UUID") from None


class Spool(PrivateSQLiteFile):
    """A durable FIFO of (msg_id, topic, payload) that must reach the cloud; thread-safe.

    One SQLite connection behind a lock: the daemon's MQTT callback thread calls `receipt`, its main
    thread the rest. Sizes count payload plus topic bytes; a full spool refuses new messages with
    `SpoolFullError` and never drops an older one.
    """

    _kind = "spool"
    _error = SpoolError
    _application_id = APPLICATION_ID
    _schema_version = SCHEMA_VERSION
    _not_ours = "spool {path} is an SQLite database but not a DiReDi spool"
    _unreadable = "spool {path} is unreadable (corrupt or not a spool): {exc}"

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        super().__init__(path)
        log.info("spool %s: %d messages pending", path, self.pending())

    def _create(self, conn: sqlite3.Connection) -> None:
        """The messages table."""
        conn.execute(_SCHEMA)

    def _check(self, conn: sqlite3.Connection, version: int) -> None:
        """A spool of this schema version and columns that passes SQLite's quick check."""
        columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
        if version != SCHEMA_VERSION or columns != _COLUMNS:
            raise SpoolError(f"spool {self.path} has schema version {version}, expected {SCHEMA_VERSION}")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise SpoolError(f"spool {self.path} is corrupt: {check}")

    def add(self, msg_id: str | uuid.UUID, topic: str, payload: bytes, *, now: float | None = None) -> None:
        """Spool a message, durably before returning; the same msg_id twice is a no-op.

        `now` (wall clock) defaults to `time.time()`. Raises SpoolFullError if the message would take
        the spool past `max_bytes`, and ValueError if msg_id is not a UUID.
        """
        key = normalize_msg_id(msg_id)
        data = bytes(payload)
        size = len(data) + len(topic.encode())
        added_at = time.time() if now is None else now
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("SELECT 1 FROM messages WHERE msg_id = ?", (key,)).fetchone() is not None:
                conn.execute("COMMIT")
                return
            used = conn.execute("SELECT coalesce(sum(size), 0) FROM messages").fetchone()[0]
            if used + size > self.max_bytes:
                conn.execute("ROLLBACK")
                log.warning("spool %s full: %d + %d bytes > %d", self.path, used, size, self.max_bytes)
                raise SpoolFullError(
                    f"spool {self.path} is full: {used} bytes pending, a message of {size} bytes "
                    f"would exceed {self.max_bytes}"
                )
            conn.execute(
                "INSERT INTO messages (msg_id, topic, size, added_at, payload) VALUES (?, ?, ?, ?, ?)",
                (key, topic, size, added_at, data),
            )
            conn.execute("COMMIT")

    def due(self, now: float, resend_after: float, limit: int = 100) -> list[SpooledMessage]:
        """Messages to send now, oldest first: never sent, or sent more than `resend_after` s ago.

        A `last_sent_at` in the future (the wall clock jumped backwards) counts as due, so a message
        cannot be stuck until the clock catches up.
        """
        with self._db() as conn:
            rows = conn.execute(
                "SELECT msg_id, topic, payload, added_at, last_sent_at, attempts FROM messages"
                " WHERE last_sent_at IS NULL OR last_sent_at < ? OR last_sent_at > ?"
                " ORDER BY seq LIMIT ?",
                (now - resend_after, now, limit),
            ).fetchall()
        return [SpooledMessage(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows]

    def mark_sent(self, msg_id: str | uuid.UUID, now: float) -> None:
        """Record that `msg_id` was published at `now`; unknown (already receipted) ids are ignored."""
        key = normalize_msg_id(msg_id)
        with self._db() as conn:
            conn.execute(
                "UPDATE messages SET last_sent_at = ?, attempts = attempts + 1 WHERE msg_id = ?", (now, key)
            )

    def receipt(self, msg_id: str | uuid.UUID) -> bool:
        """Remove `msg_id` now the cloud has committed it; True if it was spooled, False otherwise."""
        try:
            key = normalize_msg_id(msg_id)
        except ValueError:
            return False  # a receipt for something that was never a valid msg_id: nothing to remove
        with self._db() as conn:
            removed = conn.execute("DELETE FROM messages WHERE msg_id = ?", (key,)).rowcount
        return removed > 0

    def reset(self) -> None:
        """Mark every message as never sent, so after a reconnect everything goes again, in order."""
        with self._db() as conn:
            conn.execute("UPDATE messages SET last_sent_at = NULL WHERE last_sent_at IS NOT NULL")

    def pending(self) -> int:
        """How many messages wait for their receipt."""
        with self._db() as conn:
            count: int = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        return count

    def pending_bytes(self) -> int:
        """Bytes (payload plus topic) of the messages waiting for their receipt."""
        with self._db() as conn:
            used: int = conn.execute("SELECT coalesce(sum(size), 0) FROM messages").fetchone()[0]
        return used
