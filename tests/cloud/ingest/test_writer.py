"""Ingest batch writer: each message stored once, refusals with their reason, receipts for what was stored."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.ingest.writer import Accepted, BatchWriter, Written
from cloud.registry import devices, models, rollouts
from cloud.registry.devices import KnownDevice, known_devices
from cloud.registry.tables import (
    Device,
    DeviceStatus,
    KnowledgeReport,
    KnowledgeStatus,
    RolloutTarget,
    TargetState,
    Telemetry,
)
from cloud.registry.tables import ModelAck as AckRow
from cloud.registry.tables import Presence as Shown
from tests.cloud.factories import (
    knowledge_payload,
    make_cloud_model,
    make_cohort,
    make_device,
    make_edge_model,
)
from wire.common import Envelope
from wire.errors import Rejection
from wire.messages import AckResult, ModelAck, Presence, PresenceState, Status, decode, encode
from wire.topics import MessageKind, device_topic

KINDS = {Presence: MessageKind.PRESENCE, Status: MessageKind.STATUS, ModelAck: MessageKind.MODEL_ACK}


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    """An empty artifact store in the test's temporary directory."""
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def writer(sessions: sessionmaker[Session]) -> BatchWriter:
    """The writer on the test database."""
    return BatchWriter(sessions)


@dataclass(frozen=True)
class Fleet:
    """Two lines: kitchen (cam-a, cam-b; edge v1 and v2, both approved) and garage (cam-g; its own edge)."""

    v1: str
    v2: str
    garage_edge: str
    now: datetime


def two_lines(sessions: sessionmaker[Session], store: LocalArtifactStore) -> Fleet:
    """Build `Fleet`, plus cam-old, a revoked kitchen device."""
    with sessions() as session, session.begin():
        edges: dict[str, list[str]] = {}
        for cohort in ("kitchen", "garage"):
            make_cohort(session, cohort)
            teacher = make_cloud_model(session, store, cohort)
            edges[cohort] = [
                models.decide(
                    session,
                    make_edge_model(session, store, teacher_id=teacher.id, cohort_id=cohort).id,
                    approve=True,
                ).id
                for _ in range(2 if cohort == "kitchen" else 1)
            ]
        for name in ("cam-a", "cam-b", "cam-old"):
            make_device(session, name)
        make_device(session, "cam-g", "garage")
        devices.revoke_device(session, "cam-old")
    (v1, v2), (garage_edge,) = edges["kitchen"], edges["garage"]
    return Fleet(v1=v1, v2=v2, garage_edge=garage_edge, now=datetime.now(UTC))


def arrived(message: Presence | Status | ModelAck) -> Accepted:
    """`message` as the ingest hands it to the writer: sent, received and decoded by the contract."""
    payload = encode(message)
    kind, decoded = decode(device_topic(message.device_id, KINDS[type(message)]), payload)
    return Accepted(kind, decoded, payload)


def report_arrived(device_id: str, base_model_id: str) -> Accepted:
    """A knowledge report built by the factories, as the ingest hands it to the writer."""
    payload = knowledge_payload(device_id, base_model_id)
    kind, decoded = decode(device_topic(device_id, MessageKind.KNOWLEDGE), payload)
    return Accepted(kind, decoded, payload)


def status(device_id: str, at: datetime, **fields: Any) -> Status:
    """A status heartbeat, up for a minute, with the given values."""
    return Status(device_id=device_id, sent_at=at, uptime_s=60.0, **fields)


def msg_id(accepted: Accepted) -> uuid.UUID:
    """The msg_id of an accepted device message."""
    assert isinstance(accepted.message, Envelope)
    return accepted.message.msg_id


def telemetry_rows(session: Session, device_id: str | None = None) -> list[Telemetry]:
    """Stored telemetry, oldest first."""
    statement = select(Telemetry).order_by(Telemetry.at)
    if device_id is not None:
        statement = statement.where(Telemetry.device_id == device_id)
    return list(session.scalars(statement))


def count(session: Session, table: type[object]) -> int:
    """How many rows `table` holds."""
    return int(session.scalar(select(func.count()).select_from(table)) or 0)


def device(session: Session, device_id: str) -> Device:
    """The device as stored now."""
    session.expire_all()
    return session.get_one(Device, device_id)


def counts(written: Written) -> tuple[dict[MessageKind, int], dict[MessageKind, int]]:
    """(stored, duplicates) per kind, without the zeros."""
    return (
        {k: n for k, n in written.stored.items() if n},
        {k: n for k, n in written.duplicates.items() if n},
    )


def test_a_status_becomes_a_telemetry_row_with_every_field(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = two_lines(sessions, store)
    message = Status(
        device_id="cam-a",
        sent_at=fleet.now - timedelta(seconds=1),
        model_id=fleet.v1,
        uptime_s=3600.5,
        inference_count=123_456_789_012,
        latency_p50_ms=4.25,
        latency_p95_ms=9.75,
        mean_confidence=0.875,
        class_histogram={"0": 10, "3": 7, "12": 1},
        labelled_count=42,
        accuracy=0.9375,
        cpu_percent=37.5,
        mem_bytes=48 * 1024 * 1024,
        temp_c=-12.5,
    )

    # Execute
    written = writer.write([arrived(message)])

    # Assert
    assert counts(written) == ({MessageKind.STATUS: 1}, {})
    assert written.receipts == [] and written.refused == []
    with sessions() as session:
        (row,) = telemetry_rows(session)
        stored = {c.name: getattr(row, c.name) for c in Telemetry.__table__.columns if c.name != "id"}
    # trust_version is the device's state, not telemetry: it goes to the device's row
    sent = message.model_dump(exclude={"schema_", "sent_at", "trust_version"}) | {"at": message.sent_at}
    assert stored == sent  # every field of the status has its column, and every column its field
    assert stored["at"].tzinfo is not None


def test_a_status_without_optional_fields_stores_nulls(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = two_lines(sessions, store)

    # Execute
    writer.write([arrived(status("cam-a", fleet.now))])

    # Assert
    with sessions() as session:
        (row,) = telemetry_rows(session)
    assert (row.model_id, row.class_histogram, row.latency_p95_ms, row.temp_c) == (None, None, None, None)
    assert (row.uptime_s, row.inference_count) == (60.0, 0)


def test_a_redelivered_status_is_stored_once_and_counted_as_a_duplicate(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = two_lines(sessions, store)
    first = status("cam-a", fleet.now - timedelta(seconds=2))
    second = status("cam-a", fleet.now - timedelta(seconds=1))
    third = status("cam-b", fleet.now)
    writer.write([arrived(first)])

    # Execute: redelivered in a later batch, then one message twice within a batch
    later = writer.write([arrived(first), arrived(second)])
    within = writer.write([arrived(third), arrived(third)])

    # Assert
    assert counts(later) == ({MessageKind.STATUS: 1}, {MessageKind.STATUS: 1})
    assert counts(within) == ({MessageKind.STATUS: 1}, {MessageKind.STATUS: 1})
    with sessions() as session:
        assert [r.msg_id for r in telemetry_rows(session)] == [first.msg_id, second.msg_id, third.msg_id]


def test_the_latest_status_reports_its_model(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: the batch holds the newest status first
    fleet = two_lines(sessions, store)
    batch = [
        arrived(status("cam-a", fleet.now, model_id=fleet.v2)),
        arrived(status("cam-a", fleet.now - timedelta(seconds=2), model_id=fleet.v1)),
        arrived(status("cam-a", fleet.now - timedelta(seconds=1))),  # no model loaded at the time
        arrived(status("cam-b", fleet.now - timedelta(seconds=1), model_id=fleet.v1)),
    ]

    # Execute
    writer.write(batch)

    # Assert
    with sessions() as session:
        assert device(session, "cam-a").reported_model_id == fleet.v2
        assert device(session, "cam-b").reported_model_id == fleet.v1


def test_a_status_of_a_model_the_registry_does_not_know_keeps_the_reported_model(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = two_lines(sessions, store)
    writer.write([arrived(status("cam-a", fleet.now - timedelta(seconds=5), model_id=fleet.v1))])

    # Execute
    written = writer.write([arrived(status("cam-a", fleet.now, model_id="kitchen.v99"))])

    # Assert
    assert counts(written) == ({MessageKind.STATUS: 1}, {})
    with sessions() as session:
        assert device(session, "cam-a").reported_model_id == fleet.v1
        assert telemetry_rows(session)[-1].model_id == "kitchen.v99"


def test_a_redelivered_status_does_not_bring_back_the_model_it_reported(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: cam-a reported v1, then v2; the broker then delivers the v1 status again
    fleet = two_lines(sessions, store)
    old = status("cam-a", fleet.now - timedelta(seconds=10), model_id=fleet.v1)
    writer.write([arrived(old)])
    writer.write([arrived(status("cam-a", fleet.now, model_id=fleet.v2))])

    # Execute
    written = writer.write([arrived(old)])

    # Assert
    assert counts(written) == ({}, {MessageKind.STATUS: 1})
    with sessions() as session:
        assert device(session, "cam-a").reported_model_id == fleet.v2


def test_messages_of_unknown_and_revoked_devices_are_refused_and_the_rest_is_written(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = two_lines(sessions, store)
    refused = [
        arrived(status("cam-ghost", fleet.now)),
        arrived(ModelAck(device_id="cam-ghost", model_id=fleet.v2, result=AckResult.installed)),
        arrived(status("cam-old", fleet.now, model_id=fleet.v2)),
        arrived(ModelAck(device_id="cam-old", model_id=fleet.v2, result=AckResult.installed)),
        arrived(Presence(device_id="cam-old", state=PresenceState.online, conn="c9", sent_at=fleet.now)),
        report_arrived("cam-old", fleet.v1),
    ]
    good = [arrived(status("cam-a", fleet.now)), report_arrived("cam-a", fleet.v1)]
    batch = [refused[0], good[0], *refused[1:], good[1]]

    # Execute
    written = writer.write(batch)

    # Assert
    assert [a for a, _ in written.refused] == refused
    assert {e.reason for _, e in written.refused} == {Rejection.refused}
    assert all(a.message.device_id in str(e) for a, e in written.refused)
    assert counts(written) == ({MessageKind.STATUS: 1, MessageKind.KNOWLEDGE: 1}, {})
    assert written.receipts == [("cam-a", msg_id(good[1]))]
    with sessions() as session:
        assert {r.device_id for r in telemetry_rows(session)} == {"cam-a"}
        assert count(session, AckRow) == 0
        assert set(session.scalars(select(KnowledgeReport.device_id))) == {"cam-a"}
        old = device(session, "cam-old")
        assert (old.presence, old.presence_conn, old.reported_model_id, old.last_seen) == (
            Shown.offline,
            None,
            None,
            None,
        )


def test_last_seen_is_set_for_admitted_devices_only_and_never_moves_back(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: another ingest, whose clock runs ahead, already saw cam-b
    fleet = two_lines(sessions, store)
    ahead = fleet.now + timedelta(hours=1)
    with sessions() as session, session.begin():
        session.execute(update(Device).where(Device.id == "cam-b").values(last_seen=ahead))
    batch = [
        arrived(Presence(device_id="cam-a", state=PresenceState.online, conn="c1", sent_at=fleet.now)),
        arrived(status("cam-b", fleet.now)),
        arrived(status("cam-old", fleet.now)),
        arrived(status("cam-ghost", fleet.now)),
    ]

    # Execute
    writer.write(batch)
    with sessions() as session:
        first = device(session, "cam-a").last_seen
    writer.write([arrived(status("cam-a", fleet.now + timedelta(seconds=1)))])

    # Assert
    with sessions() as session:
        seen = {d: device(session, d).last_seen for d in ("cam-a", "cam-b", "cam-g", "cam-old")}
    assert first is not None and seen["cam-a"] is not None
    assert fleet.now <= first <= seen["cam-a"] <= datetime.now(UTC)
    assert seen["cam-b"] == ahead
    assert (seen["cam-g"], seen["cam-old"]) == (None, None)


def test_a_knowledge_report_is_stored_received_and_gets_a_receipt_also_when_sent_again(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = two_lines(sessions, store)
    report = report_arrived("cam-a", fleet.v1)

    # Execute
    first = writer.write([report])
    again = writer.write([report])

    # Assert
    assert counts(first) == ({MessageKind.KNOWLEDGE: 1}, {})
    assert counts(again) == ({}, {MessageKind.KNOWLEDGE: 1})
    assert first.receipts == again.receipts == [("cam-a", msg_id(report))]
    with sessions() as session:
        row = session.get_one(KnowledgeReport, msg_id(report))
        assert (row.status, row.device_id, row.base_model_id) == (KnowledgeStatus.received, "cam-a", fleet.v1)
        assert row.payload == report.payload
        assert count(session, KnowledgeReport) == 1


def test_a_report_on_another_cohorts_model_is_refused_without_a_receipt(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = two_lines(sessions, store)
    foreign = report_arrived("cam-b", fleet.garage_edge)
    own = report_arrived("cam-g", fleet.garage_edge)
    heartbeat = arrived(status("cam-a", fleet.now))

    # Execute
    written = writer.write([foreign, heartbeat, own])

    # Assert
    ((refused, error),) = written.refused
    assert refused is foreign and error.reason is Rejection.refused
    assert written.receipts == [("cam-g", msg_id(own))]
    assert counts(written) == ({MessageKind.STATUS: 1, MessageKind.KNOWLEDGE: 1}, {})
    with sessions() as session:
        assert set(session.scalars(select(KnowledgeReport.device_id))) == {"cam-g"}
        assert len(telemetry_rows(session, "cam-a")) == 1
        assert device(session, "cam-b").last_seen is None  # all it sent was refused


def test_acks_are_stored_once_and_get_a_receipt_every_time(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: a rollout of v2 offered to cam-a
    fleet = two_lines(sessions, store)
    with sessions() as session, session.begin():
        rollout_id = rollouts.create_rollout(
            session, model_id=fleet.v2, waves=[["cam-a"]], created_by="ops"
        ).id
    message = ModelAck(device_id="cam-a", model_id=fleet.v2, result=AckResult.installed, sent_at=fleet.now)

    # Execute
    first = writer.write([arrived(message), arrived(message)])
    again = writer.write([arrived(message)])

    # Assert
    assert counts(first) == ({MessageKind.MODEL_ACK: 1}, {MessageKind.MODEL_ACK: 1})
    assert counts(again) == ({}, {MessageKind.MODEL_ACK: 1})
    assert first.receipts == [("cam-a", message.msg_id)] * 2
    assert again.receipts == [("cam-a", message.msg_id)]
    with sessions() as session:
        assert count(session, AckRow) == 1
        assert session.get_one(RolloutTarget, (rollout_id, "cam-a")).state is TargetState.installed
        assert device(session, "cam-a").reported_model_id == fleet.v2


def test_presence_in_a_batch_is_applied_by_the_conn_rule(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: cam-a reconnected (c2), then c1's stale will came; cam-b's will came before its online
    fleet = two_lines(sessions, store)
    at = fleet.now
    batch = [
        arrived(Presence(device_id="cam-a", state=PresenceState.online, conn="c1", sent_at=at)),
        arrived(
            Presence(
                device_id="cam-a", state=PresenceState.online, conn="c2", sent_at=at + timedelta(seconds=9)
            )
        ),
        arrived(Presence(device_id="cam-a", state=PresenceState.offline, conn="c1", sent_at=at)),
        arrived(Presence(device_id="cam-b", state=PresenceState.offline, conn="c7", sent_at=at)),
        arrived(Presence(device_id="cam-b", state=PresenceState.online, conn="c7", sent_at=at)),
    ]

    # Execute
    written = writer.write(batch)

    # Assert
    assert counts(written) == ({MessageKind.PRESENCE: 5}, {})
    assert written.receipts == []
    with sessions() as session:
        a, b = device(session, "cam-a"), device(session, "cam-b")
        assert (a.presence, a.presence_conn) == (Shown.online, "c2")
        assert (b.presence, b.presence_conn) == (Shown.offline, "c7")


def test_a_message_the_database_rejects_is_refused_alone(
    writer: BatchWriter,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the registry check lets cam-ghost through, so its ack breaks the foreign key
    fleet = two_lines(sessions, store)

    def also_ghost(session: Session, device_ids: Collection[str]) -> dict[str, KnownDevice]:
        known = known_devices(session, device_ids)
        if "cam-ghost" in device_ids:
            known["cam-ghost"] = KnownDevice(DeviceStatus.active, None)
        return known

    monkeypatch.setattr("cloud.ingest.writer.known_devices", also_ghost)
    ghost = arrived(ModelAck(device_id="cam-ghost", model_id=fleet.v2, result=AckResult.installed))
    report = report_arrived("cam-a", fleet.v1)
    batch = [arrived(status("cam-a", fleet.now)), ghost, report]

    # Execute
    written = writer.write(batch)

    # Assert
    ((refused, error),) = written.refused
    assert refused is ghost and error.reason is Rejection.refused
    assert counts(written) == ({MessageKind.STATUS: 1, MessageKind.KNOWLEDGE: 1}, {})
    assert written.receipts == [("cam-a", msg_id(report))]
    with sessions() as session:
        assert [r.device_id for r in telemetry_rows(session)] == ["cam-a"]


def test_a_status_beyond_a_columns_range_never_stops_the_batch(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: a value the contract would let through but a column cannot hold (the contract now bounds
    # labelled_count to its 32-bit column; model_copy skips validation to stand in for such a mismatch)
    fleet = two_lines(sessions, store)
    huge = Accepted(
        MessageKind.STATUS, status("cam-a", fleet.now).model_copy(update={"labelled_count": 2**40}), b""
    )
    fine = arrived(status("cam-b", fleet.now))
    postgres = sessions.kw["bind"].dialect.name == "postgresql"

    # Execute
    written = writer.write([huge, fine])

    # Assert: the rest is written; the huge one is stored where it fits, else refused with the reason
    assert [(a, e.reason) for a, e in written.refused] == ([(huge, Rejection.refused)] if postgres else [])
    assert counts(written) == ({MessageKind.STATUS: 1 if postgres else 2}, {})
    with sessions() as session:
        assert "cam-b" in {r.device_id for r in telemetry_rows(session)}


def test_an_empty_batch_writes_nothing(writer: BatchWriter, sessions: sessionmaker[Session]) -> None:
    # Execute
    written = writer.write([])

    # Assert
    assert written == Written()


def test_a_status_reports_the_trust_version_the_device_holds(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: the batch holds cam-a's newest status first; cam-b's firmware does not report one
    fleet = two_lines(sessions, store)
    batch = [
        arrived(status("cam-a", fleet.now, trust_version=3)),
        arrived(status("cam-a", fleet.now - timedelta(seconds=2), trust_version=2)),
        arrived(status("cam-b", fleet.now)),
        arrived(status("cam-old", fleet.now, trust_version=3)),  # revoked: refused
    ]

    # Execute
    writer.write(batch)
    writer.write([arrived(status("cam-a", fleet.now + timedelta(seconds=1)))])  # no version: kept

    # Assert
    with sessions() as session:
        versions = {d: device(session, d).trust_version for d in ("cam-a", "cam-b", "cam-g", "cam-old")}
    assert versions == {"cam-a": 3, "cam-b": None, "cam-g": None, "cam-old": None}


def test_the_trust_version_is_written_only_when_it_changed(
    writer: BatchWriter,
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: every heartbeat carries the version; the registry is told only of changes
    fleet = two_lines(sessions, store)
    told: list[dict[str, int]] = []

    def recording(session: Session, versions: dict[str, int]) -> None:
        told.append(dict(versions))
        devices.report_trust(session, versions)

    monkeypatch.setattr("cloud.ingest.writer.report_trust", recording)

    # Execute
    for seconds, version in [(0, 1), (1, 1), (2, 2), (3, 2)]:
        at = fleet.now + timedelta(seconds=seconds)
        writer.write([arrived(status("cam-a", at, trust_version=version)), arrived(status("cam-b", at))])

    # Assert
    assert [t for t in told if t] == [{"cam-a": 1}, {"cam-a": 2}]
    with sessions() as session:
        assert (device(session, "cam-a").trust_version, device(session, "cam-b").trust_version) == (2, None)


def test_a_status_that_arrives_late_does_not_take_the_trust_version_back(
    writer: BatchWriter, sessions: sessionmaker[Session], store: LocalArtifactStore
) -> None:
    # Prepare: version 3 recorded; an older heartbeat of version 2 arrives afterwards, in a later batch
    fleet = two_lines(sessions, store)
    writer.write([arrived(status("cam-a", fleet.now, trust_version=3))])

    # Execute
    writer.write([arrived(status("cam-a", fleet.now - timedelta(seconds=30), trust_version=2))])

    # Assert
    with sessions() as session:
        assert device(session, "cam-a").trust_version == 3
