"""Registry device commands: created pending, listed newest first, sent to online devices, expired, and
finished by the device's result once (on SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from cloud.exceptions import ConflictError, NotFoundError
from cloud.registry import commands, devices
from cloud.registry.commands import Recorded
from cloud.registry.tables import CommandState, DeviceCommand
from tests.cloud.factories import make_cohort, make_device
from wire.messages import CommandName, CommandOutcome, CommandResult

NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def online(session: Session, device_id: str) -> None:
    """The device's presence is online, as the ingest would set it."""
    devices.apply_presence(session, device_id, online=True, conn="c1", sent_at=NOW - HOUR)


def fleet(session: Session, *names: str) -> None:
    """The kitchen cohort with these devices, all active and offline."""
    make_cohort(session)
    for name in names:
        make_device(session, name)
    session.commit()


def order(
    session: Session, device_id: str, command: CommandName = CommandName.report_now, **kw: Any
) -> uuid.UUID:
    """A command created for `device_id` at NOW (ttl one hour unless given); its id."""
    kw.setdefault("ttl", HOUR)
    kw.setdefault("now", NOW)
    row = commands.create(session, device_id=device_id, command=command, requested_by="key:ops", **kw)
    session.commit()
    return row.id


def result(command_id: uuid.UUID, device_id: str = "cam-a", **fields: Any) -> CommandResult:
    """A device's result for the command, done unless told otherwise."""
    fields.setdefault("command", CommandName.report_now)
    fields.setdefault("outcome", CommandOutcome.done)
    return CommandResult(device_id=device_id, ack_of=command_id, **fields)


def test_a_created_command_is_pending_until_its_ttl_from_now(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a")

    # Execute
    command_id = order(session, "cam-a", CommandName.run_rd, ttl=timedelta(minutes=5))

    # Assert
    row = commands.get(session, device_id="cam-a", command_id=command_id)
    assert (row.state, row.command, row.requested_by) == (CommandState.pending, CommandName.run_rd, "key:ops")
    assert row.created_at == NOW and row.expires_at == NOW + timedelta(minutes=5)
    assert (row.sent_at, row.finished_at, row.send_count, row.result_msg_id) == (None, None, 0, None)


def test_a_command_for_an_unknown_device_is_not_found_and_a_revoked_one_conflicts(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a")
    devices.revoke_device(session, "cam-a")
    session.commit()

    # Execute / Assert
    with pytest.raises(NotFoundError):
        commands.create(session, device_id="cam-zz", command=CommandName.report_now, ttl=HOUR)
    with pytest.raises(ConflictError, match="revoked"):
        commands.create(session, device_id="cam-a", command=CommandName.report_now, ttl=HOUR)


def test_a_devices_commands_are_listed_newest_first_in_pages_without_another_devices(
    session: Session,
) -> None:
    # Prepare
    fleet(session, "cam-a", "cam-b")
    ids = [order(session, "cam-a", now=NOW + timedelta(seconds=i)) for i in range(3)]
    order(session, "cam-b")

    # Execute
    first, total = commands.list_for_device(session, device_id="cam-a", limit=2, offset=0)
    rest, _ = commands.list_for_device(session, device_id="cam-a", limit=2, offset=2)

    # Assert
    assert total == 3
    assert [c.id for c in [*first, *rest]] == ids[::-1]


def test_listing_filters_by_state_and_an_unknown_device_is_not_found(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a")
    sent = order(session, "cam-a")
    order(session, "cam-a")
    commands.mark_sent(session, command_ids=[sent], now=NOW)
    session.commit()

    # Execute
    rows, total = commands.list_for_device(
        session, device_id="cam-a", limit=10, offset=0, state=CommandState.sent
    )

    # Assert
    assert ([r.id for r in rows], total) == ([sent], 1)
    with pytest.raises(NotFoundError):
        commands.list_for_device(session, device_id="cam-zz", limit=10, offset=0)


def test_get_refuses_another_devices_command(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a", "cam-b")
    command_id = order(session, "cam-a")

    # Execute / Assert
    with pytest.raises(NotFoundError):
        commands.get(session, device_id="cam-b", command_id=command_id)
    with pytest.raises(NotFoundError):
        commands.get(session, device_id="cam-a", command_id=uuid.uuid4())


def test_only_online_active_devices_unexpired_commands_are_due_and_unanswered_ones_again_later(
    session: Session,
) -> None:
    # Prepare: cam-a online, cam-b offline, cam-c online but revoked after its command was created.
    fleet(session, "cam-a", "cam-b", "cam-c")
    due = order(session, "cam-a")
    stale = order(session, "cam-a", ttl=timedelta(seconds=10))
    offline = order(session, "cam-b")
    revoked = order(session, "cam-c")
    for name in ("cam-a", "cam-c"):
        online(session, name)
    devices.revoke_device(session, "cam-c")
    session.commit()
    later = NOW + timedelta(seconds=30)

    # Execute
    first = [c.id for c in commands.pending_for(session, now=later)]
    commands.mark_sent(session, command_ids=first, now=later)
    session.commit()
    right_after = [c.id for c in commands.pending_for(session, now=later + timedelta(seconds=5))]
    a_minute_on = [c.id for c in commands.pending_for(session, now=later + timedelta(minutes=2))]

    # Assert
    assert first == [due]
    assert stale not in first and offline not in first and revoked not in first
    assert right_after == []
    assert a_minute_on == [due]  # sent, never answered: sent again (same msg_id)


def test_mark_sent_counts_each_send_and_leaves_a_finished_command_finished(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a")
    open_id, finished_id = order(session, "cam-a"), order(session, "cam-a")
    commands.record_result(session, result(finished_id), received_at=NOW)

    # Execute
    changed = commands.mark_sent(session, command_ids=[open_id, finished_id], now=NOW)
    commands.mark_sent(session, command_ids=[open_id], now=NOW + HOUR / 2)
    session.commit()

    # Assert
    assert changed == 1
    opened = commands.get(session, device_id="cam-a", command_id=open_id)
    session.refresh(opened)
    assert (opened.state, opened.send_count, opened.sent_at) == (CommandState.sent, 2, NOW + HOUR / 2)
    finished = commands.get(session, device_id="cam-a", command_id=finished_id)
    session.refresh(finished)
    assert (finished.state, finished.send_count) == (CommandState.done, 0)


def test_expire_due_finishes_open_commands_past_their_time_only(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a")
    short = order(session, "cam-a", ttl=timedelta(seconds=10))
    sent = order(session, "cam-a", ttl=timedelta(seconds=10))
    long = order(session, "cam-a")
    answered = order(session, "cam-a", ttl=timedelta(seconds=10))
    commands.mark_sent(session, command_ids=[sent], now=NOW)
    commands.record_result(session, result(answered), received_at=NOW)
    session.commit()

    # Execute
    expired = commands.expire_due(session, now=NOW + timedelta(seconds=10))
    session.commit()

    # Assert
    assert expired == 2
    states = {
        i: session.get(DeviceCommand, i, populate_existing=True).state  # type: ignore[union-attr]
        for i in (short, sent, long, answered)
    }
    assert states == {
        short: CommandState.expired,
        sent: CommandState.expired,
        long: CommandState.pending,
        answered: CommandState.done,
    }


@pytest.mark.parametrize("outcome", list(CommandOutcome))
def test_a_result_finishes_its_command_with_the_devices_outcome_detail_and_values(
    session: Session, outcome: CommandOutcome
) -> None:
    # Prepare
    fleet(session, "cam-a")
    command_id = order(session, "cam-a", CommandName.run_rd)
    values = {"knowledge_msg_id": str(uuid.uuid4()), "samples": 120}
    message = result(command_id, command=CommandName.run_rd, outcome=outcome, detail="why", values=values)

    # Execute
    recorded = commands.record_result(session, message, received_at=NOW + timedelta(seconds=2))
    session.commit()

    # Assert
    assert recorded is Recorded.stored
    row = commands.get(session, device_id="cam-a", command_id=command_id)
    session.refresh(row)
    assert (row.state.value, row.detail, row.values) == (outcome.value, "why", values)
    assert (row.finished_at, row.result_msg_id) == (NOW + timedelta(seconds=2), message.msg_id)


def test_a_result_is_stored_once_and_a_second_answer_changes_nothing(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a")
    command_id = order(session, "cam-a")
    first = result(command_id, detail="first")
    commands.record_result(session, first, received_at=NOW)
    session.commit()

    # Execute
    again = commands.record_result(session, first, received_at=NOW + HOUR)
    other = commands.record_result(
        session, result(command_id, outcome=CommandOutcome.failed, detail="second"), received_at=NOW + HOUR
    )
    session.commit()

    # Assert
    assert (again, other) == (Recorded.duplicate, Recorded.duplicate)
    row = commands.get(session, device_id="cam-a", command_id=command_id)
    session.refresh(row)
    assert (row.state, row.detail, row.result_msg_id, row.finished_at) == (
        CommandState.done,
        "first",
        first.msg_id,
        NOW,
    )


def test_a_late_result_still_finishes_a_command_the_cloud_expired(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a")
    command_id = order(session, "cam-a", ttl=timedelta(seconds=10))
    commands.expire_due(session, now=NOW + HOUR)
    session.commit()

    # Execute
    recorded = commands.record_result(session, result(command_id), received_at=NOW + HOUR)
    session.commit()

    # Assert
    assert recorded is Recorded.stored
    row = commands.get(session, device_id="cam-a", command_id=command_id)
    session.refresh(row)
    assert row.state is CommandState.done


def test_a_result_for_an_unknown_or_another_devices_or_another_command_is_refused(session: Session) -> None:
    # Prepare
    fleet(session, "cam-a", "cam-b")
    command_id = order(session, "cam-a")

    # Execute / Assert
    with pytest.raises(NotFoundError):
        commands.record_result(session, result(uuid.uuid4()))
    with pytest.raises(NotFoundError):
        commands.record_result(session, result(command_id, device_id="cam-b"))
    with pytest.raises(ConflictError, match="report_now, not run_rd"):
        commands.record_result(session, result(command_id, command=CommandName.run_rd))
    session.commit()
    row = commands.get(session, device_id="cam-a", command_id=command_id)
    assert (row.state, row.result_msg_id) == (CommandState.pending, None)


def test_two_sessions_recording_different_results_store_exactly_one(sessions: sessionmaker[Session]) -> None:
    # Prepare
    with sessions() as session:
        fleet(session, "cam-a")
        command_id = order(session, "cam-a")
    answers = [result(command_id, detail=str(n)) for n in range(2)]

    # Execute: each in its own transaction, as two ingests would.
    outcomes = []
    for answer in answers:
        with sessions() as session, session.begin():
            outcomes.append(commands.record_result(session, answer, received_at=NOW))

    # Assert
    assert outcomes == [Recorded.stored, Recorded.duplicate]
    with sessions() as session:
        assert commands.get(session, device_id="cam-a", command_id=command_id).detail == "0"
