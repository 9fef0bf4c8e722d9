"""Ingest batch writer and command results: stored once on their command, duplicates counted, results
for unknown or other devices' commands refused with the reason, the rest of the batch still written."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.ingest.writer import Accepted, BatchWriter
from cloud.registry import commands, devices
from cloud.registry.tables import CommandState, DeviceCommand, Telemetry
from tests.cloud.factories import make_cohort, make_device
from wire.errors import Rejection
from wire.messages import CommandName, CommandOutcome, CommandResult, Status, decode, encode
from wire.topics import MessageKind, device_topic


@pytest.fixture
def writer(sessions: sessionmaker[Session]) -> BatchWriter:
    return BatchWriter(sessions)


@pytest.fixture
def fleet(sessions: sessionmaker[Session]) -> dict[str, uuid.UUID]:
    """cam-a and cam-b, each with a sent run_rd command, and cam-old, revoked after it got one; the
    commands by device."""
    with sessions() as session, session.begin():
        make_cohort(session)
        sent = {}
        for name in ("cam-a", "cam-b", "cam-old"):
            make_device(session, name)
            sent[name] = commands.create(
                session, device_id=name, command=CommandName.run_rd, ttl=timedelta(hours=1)
            ).id
        commands.mark_sent(session, command_ids=list(sent.values()))
        devices.revoke_device(session, "cam-old")
    return sent


def arrived(message: CommandResult | Status) -> Accepted:
    """`message` as the ingest hands it to the writer: sent, received and decoded by the contract."""
    kind = MessageKind.CMD_RESULT if isinstance(message, CommandResult) else MessageKind.STATUS
    payload = encode(message)
    decoded_kind, decoded = decode(device_topic(message.device_id, kind), payload)
    return Accepted(decoded_kind, decoded, payload)


def result(command_id: uuid.UUID, device_id: str = "cam-a", **fields: Any) -> CommandResult:
    """A device's result, `done` for run_rd unless told otherwise."""
    fields.setdefault("command", CommandName.run_rd)
    fields.setdefault("outcome", CommandOutcome.done)
    return CommandResult(device_id=device_id, ack_of=command_id, **fields)


def stored(sessions: sessionmaker[Session], command_id: uuid.UUID) -> DeviceCommand:
    with sessions() as session:
        return session.get_one(DeviceCommand, command_id)


def test_a_result_finishes_its_command_once_and_a_redelivery_is_a_duplicate(
    writer: BatchWriter, sessions: sessionmaker[Session], fleet: dict[str, uuid.UUID]
) -> None:
    # Prepare
    report = str(uuid.uuid4())
    message = result(
        fleet["cam-a"], detail="knowledge report from 40 samples", values={"knowledge_msg_id": report}
    )

    # Execute
    first = writer.write([arrived(message), arrived(message)])
    again = writer.write([arrived(message)])

    # Assert
    assert (first.stored[MessageKind.CMD_RESULT], first.duplicates[MessageKind.CMD_RESULT]) == (1, 1)
    assert (again.stored[MessageKind.CMD_RESULT], again.duplicates[MessageKind.CMD_RESULT]) == (0, 1)
    assert first.refused == [] and first.receipts == []  # a device does not spool its answers
    row = stored(sessions, fleet["cam-a"])
    assert (row.state, row.result_msg_id, row.values) == (
        CommandState.done,
        message.msg_id,
        {"knowledge_msg_id": report},
    )
    assert row.detail == "knowledge report from 40 samples" and row.finished_at is not None


def test_a_second_different_answer_changes_nothing(
    writer: BatchWriter, sessions: sessionmaker[Session], fleet: dict[str, uuid.UUID]
) -> None:
    # Prepare
    writer.write([arrived(result(fleet["cam-a"], detail="first"))])

    # Execute
    written = writer.write([arrived(result(fleet["cam-a"], outcome=CommandOutcome.failed, detail="second"))])

    # Assert
    assert written.duplicates[MessageKind.CMD_RESULT] == 1 and written.refused == []
    assert (stored(sessions, fleet["cam-a"]).state, stored(sessions, fleet["cam-a"]).detail) == (
        CommandState.done,
        "first",
    )


def test_results_for_unknown_other_or_mismatched_commands_are_refused_and_the_rest_is_written(
    writer: BatchWriter, sessions: sessionmaker[Session], fleet: dict[str, uuid.UUID]
) -> None:
    # Prepare
    unknown = result(uuid.uuid4())
    anothers = result(fleet["cam-b"])  # cam-a answering cam-b's command
    mismatched = result(fleet["cam-a"], command=CommandName.report_now)
    revoked = result(fleet["cam-old"], device_id="cam-old")
    good = result(fleet["cam-b"], device_id="cam-b")
    heartbeat = Status(device_id="cam-a", uptime_s=5.0, sent_at=datetime.now(UTC))

    # Execute
    written = writer.write([arrived(m) for m in (unknown, anothers, mismatched, revoked, good, heartbeat)])

    # Assert
    reasons = {a.message.msg_id: (e.reason, str(e)) for a, e in written.refused}  # type: ignore[union-attr]
    assert set(reasons) == {unknown.msg_id, anothers.msg_id, mismatched.msg_id, revoked.msg_id}
    assert all(reason is Rejection.refused for reason, _ in reasons.values())
    assert "not found" in reasons[unknown.msg_id][1] and "not found" in reasons[anothers.msg_id][1]
    assert "is run_rd, not report_now" in reasons[mismatched.msg_id][1]
    assert "cam-old is revoked" in reasons[revoked.msg_id][1]
    assert (written.stored[MessageKind.CMD_RESULT], written.stored[MessageKind.STATUS]) == (1, 1)
    assert stored(sessions, fleet["cam-a"]).state is CommandState.sent
    assert stored(sessions, fleet["cam-b"]).state is CommandState.done
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Telemetry)) == 1
