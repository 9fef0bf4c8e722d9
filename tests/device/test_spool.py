"""device_firmware_py.spool: order, idempotence, resend timing, receipts, limits, durability, safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_firmware_py.exceptions import SpoolError, SpoolFullError
from device_firmware_py.spool import Spool

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "diredi/v1/dev/dev-1/knowledge"


def msg_id(n: int) -> str:
    """A stable UUID for message number `n`, so a child process and the test agree on ids."""
    return str(uuid.UUID(int=n + 1))


def fill(spool: Spool, count: int, *, start: int = 0, now: float = 1000.0) -> list[str]:
    """Add `count` small messages and return their ids in the order they were added."""
    ids = [msg_id(n) for n in range(start, start + count)]
    for n, key in enumerate(ids):
        spool.add(key, TOPIC, f"payload {n}".encode(), now=now)
    return ids


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(tmp_path / "spool.sqlite3") as opened:
        yield opened


def test_due_returns_messages_in_the_order_they_were_added(spool: Spool) -> None:
    # Prepare
    ids = [str(uuid.uuid4()) for _ in range(20)]  # random ids: order must not come from their sort
    for n, key in enumerate(ids):
        spool.add(key, TOPIC, bytes([n]))

    # Execute
    due = spool.due(now=2e9, resend_after=30.0)

    # Assert
    assert [m.msg_id for m in due] == ids
    assert [m.payload for m in due] == [bytes([n]) for n in range(20)]
    assert all(m.topic == TOPIC and m.last_sent_at is None and m.attempts == 0 for m in due)


def test_due_returns_at_most_limit_messages_oldest_first(spool: Spool) -> None:
    # Prepare
    ids = fill(spool, 10)

    # Execute
    due = spool.due(now=2000.0, resend_after=30.0, limit=3)

    # Assert
    assert [m.msg_id for m in due] == ids[:3]


def test_adding_the_same_msg_id_twice_keeps_one_entry(spool: Spool) -> None:
    # Prepare
    key = uuid.uuid4()
    spool.add(key, TOPIC, b"first")

    # Execute
    spool.add(str(key).upper(), TOPIC, b"second")  # the same UUID, spelled differently
    spool.add(key, TOPIC, b"third")

    # Assert
    assert spool.pending() == 1
    assert [m.payload for m in spool.due(now=2e9, resend_after=30.0)] == [b"first"]


def test_a_msg_id_that_is_not_a_uuid_is_refused(spool: Spool) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="not a UUID"):
        spool.add("report-1", TOPIC, b"x")
    assert spool.pending() == 0


def test_a_sent_message_is_due_again_only_after_resend_after(spool: Spool) -> None:
    # Prepare
    first, second = fill(spool, 2)
    spool.mark_sent(first, now=1000.0)

    # Execute
    soon = spool.due(now=1029.0, resend_after=30.0)
    later = spool.due(now=1031.0, resend_after=30.0)

    # Assert
    assert [m.msg_id for m in soon] == [second]
    assert [m.msg_id for m in later] == [first, second]
    assert later[0].last_sent_at == 1000.0
    assert later[0].attempts == 1


def test_mark_sent_counts_attempts_and_ignores_unknown_ids(spool: Spool) -> None:
    # Prepare
    (key,) = fill(spool, 1)

    # Execute
    spool.mark_sent(key, now=1000.0)
    spool.mark_sent(key, now=1100.0)
    spool.mark_sent(msg_id(99), now=1100.0)

    # Assert
    (message,) = spool.due(now=2000.0, resend_after=30.0)
    assert (message.attempts, message.last_sent_at) == (2, 1100.0)
    assert spool.pending() == 1


def test_a_clock_that_jumped_backwards_does_not_strand_a_sent_message(spool: Spool) -> None:
    # Prepare
    (key,) = fill(spool, 1)
    spool.mark_sent(key, now=2_000_000_000.0)

    # Execute: the wall clock was set back by a day
    due = spool.due(now=2_000_000_000.0 - 86_400, resend_after=30.0)

    # Assert
    assert [m.msg_id for m in due] == [key]


def test_receipt_removes_the_message(spool: Spool) -> None:
    # Prepare
    first, second, third = fill(spool, 3)

    # Execute
    removed = spool.receipt(uuid.UUID(second))  # the receipt's ack_of is a UUID

    # Assert
    assert removed is True
    assert [m.msg_id for m in spool.due(now=2000.0, resend_after=30.0)] == [first, third]
    assert spool.pending() == 2


@pytest.mark.parametrize("ack_of", [msg_id(42), "not-a-uuid"])
def test_a_receipt_for_an_unknown_msg_id_returns_false(spool: Spool, ack_of: str) -> None:
    # Prepare
    fill(spool, 2)

    # Execute
    removed = spool.receipt(ack_of)

    # Assert
    assert removed is False
    assert spool.pending() == 2


def test_a_second_receipt_for_the_same_message_returns_false(spool: Spool) -> None:
    # Prepare
    (key,) = fill(spool, 1)
    spool.receipt(key)

    # Execute
    again = spool.receipt(key)

    # Assert
    assert again is False
    assert spool.pending() == 0


def test_reset_makes_everything_due_again_in_order(spool: Spool) -> None:
    # Prepare
    ids = fill(spool, 5)
    for key in ids[::2]:
        spool.mark_sent(key, now=1000.0)

    # Execute
    spool.reset()

    # Assert
    due = spool.due(now=1001.0, resend_after=30.0)
    assert [m.msg_id for m in due] == ids
    assert all(m.last_sent_at is None for m in due)
    assert [m.attempts for m in due] == [1, 0, 1, 0, 1]  # the history of attempts is kept


def test_pending_bytes_counts_payload_and_topic(spool: Spool) -> None:
    # Prepare
    spool.add(msg_id(1), "t/a", b"12345")
    spool.add(msg_id(2), "t/bb", b"")

    # Execute
    used = spool.pending_bytes()

    # Assert
    assert used == (3 + 5) + (4 + 0)


def test_a_full_spool_refuses_a_message_and_keeps_the_older_ones(tmp_path: Path) -> None:
    # Prepare
    with Spool(tmp_path / "spool.sqlite3", max_bytes=100) as spool:
        spool.add(msg_id(1), "t", b"x" * 59)
        spool.add(msg_id(2), "t", b"x" * 39)  # 60 + 40 = exactly the limit

        # Execute
        with pytest.raises(SpoolFullError, match="full"):
            spool.add(msg_id(3), "t", b"x")
        spool.add(msg_id(1), "t", b"x" * 59)  # a duplicate is still a no-op, not an error

        # Assert
        assert [m.msg_id for m in spool.due(now=2e9, resend_after=30.0)] == [msg_id(1), msg_id(2)]
        assert spool.pending_bytes() == 100
        spool.receipt(msg_id(1))
        spool.add(msg_id(3), "t", b"x")  # room again once a receipt came in
        assert spool.pending() == 2


def test_messages_and_their_send_state_survive_reopening(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "spool.sqlite3"
    with Spool(path) as spool:
        ids = fill(spool, 4, now=500.0)
        spool.mark_sent(ids[1], now=1000.0)
        spool.receipt(ids[0])

    # Execute
    with Spool(path) as reopened:
        due = reopened.due(now=1010.0, resend_after=30.0)
        everything = reopened.due(now=2000.0, resend_after=30.0)

    # Assert
    assert [m.msg_id for m in due] == ids[2:]
    assert [(m.msg_id, m.last_sent_at, m.attempts, m.added_at) for m in everything] == [
        (ids[1], 1000.0, 1, 500.0),
        (ids[2], None, 0, 500.0),
        (ids[3], None, 0, 500.0),
    ]


# The writer: adds messages forever, printing each msg_id once its add returned.
WRITER = """
import sys, uuid
from pathlib import Path
from device_firmware_py.spool import Spool

spool = Spool(Path(sys.argv[1]))
n = 0
while True:
    key = str(uuid.UUID(int=n + 1))
    spool.add(key, "diredi/v1/dev/dev-1/knowledge", b"report %d " % n + b"x" * 2000)
    print("added", key, flush=True)
    n += 1
"""


def test_every_add_that_returned_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "spool.sqlite3"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    for _ in range(150):  # let it get well into the stream
        assert child.stdout.readline().startswith("added ")

    # Execute
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    rest = child.stdout.read()
    child.stdout.close()

    # Assert
    assert child.returncode == -signal.SIGKILL
    printed = 150 + len([line for line in rest.splitlines() if line.startswith("added ")])
    with Spool(path) as spool:
        stored = [m.msg_id for m in spool.due(now=2e9, resend_after=30.0, limit=1_000_000)]
    assert len(stored) >= printed  # the add in flight at the kill may or may not have landed
    assert stored[:printed] == [msg_id(n) for n in range(printed)]


def test_receipts_from_another_thread_while_the_main_thread_adds(spool: Spool) -> None:
    # Prepare
    count = 300
    errors: list[BaseException] = []
    added = threading.Semaphore(0)

    def receive() -> None:
        try:
            for n in range(count):
                added.acquire()
                if n % 2 == 0:
                    assert spool.receipt(msg_id(n))
        except BaseException as exc:  # reported by the main thread's asserts
            errors.append(exc)

    receiver = threading.Thread(target=receive)
    receiver.start()

    # Execute
    for n in range(count):
        spool.add(msg_id(n), TOPIC, b"x")
        added.release()
        spool.due(now=2e9, resend_after=30.0, limit=5)
    receiver.join(timeout=60)

    # Assert
    assert not receiver.is_alive()
    assert errors == []
    remaining = spool.due(now=2e9, resend_after=30.0, limit=count)
    assert [m.msg_id for m in remaining] == [msg_id(n) for n in range(1, count, 2)]


def test_a_garbage_file_raises_spool_error_naming_it_and_is_left_alone(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "spool.sqlite3"
    garbage = os.urandom(8192)
    path.write_bytes(garbage)

    # Execute
    with pytest.raises(SpoolError) as raised:
        Spool(path)

    # Assert
    assert str(path) in str(raised.value)
    assert path.read_bytes() == garbage


def test_another_sqlite_database_is_not_taken_for_a_spool(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "spool.sqlite3"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE messages (id INTEGER)")
    other.close()

    # Execute / Assert
    with pytest.raises(SpoolError, match="not a DiReDi spool"):
        Spool(path)


def test_a_closed_spool_raises_spool_error(tmp_path: Path) -> None:
    # Prepare
    spool = Spool(tmp_path / "spool.sqlite3")
    spool.close()

    # Execute / Assert
    with pytest.raises(SpoolError, match="closed"):
        spool.add(msg_id(1), TOPIC, b"x")
    spool.close()  # closing twice is fine


def test_the_spool_file_and_a_new_parent_directory_are_private(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "state" / "spool.sqlite3"

    # Execute
    with Spool(path) as spool:
        spool.add(msg_id(1), TOPIC, b"x")
        # while open, so the WAL and shared-memory files are there too
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.parent.iterdir()}

    # Assert
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert set(modes) >= {"spool.sqlite3", "spool.sqlite3-wal"}
    assert set(modes.values()) == {0o600}


def test_an_existing_spool_file_is_made_private(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "spool.sqlite3"
    path.touch(mode=0o644)
    path.chmod(0o644)

    # Execute
    Spool(path).close()

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
