"""The ingest service in-process against real brokers: the embedded one (MQTT 3.1.1, plain subscriptions,
SQLite) and mosquitto with the production configuration (MQTT 5, shared subscriptions, PostgreSQL).

On the session's mosquitto the ingest also receives every retained presence other tests left (devices
this registry does not know: refused), so the counters are compared as differences between two
moments at which the ingest had processed everything delivered before them (`settle`)."""

from __future__ import annotations

import json
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.ingest.service import Ingest
from cloud.registry import rollouts
from cloud.registry.tables import (
    Device,
    KnowledgeReport,
    KnowledgeStatus,
    RolloutTarget,
    TargetState,
    Telemetry,
)
from cloud.registry.tables import ModelAck as AckRow
from cloud.registry.tables import Presence as Shown
from tests.brokers import RunningBroker, provisioned_device
from tests.cloud.factories import knowledge_payload
from tests.cloud.ingest.device_script import Enrolled, ScriptedDevice, enrol
from tests.polling import wait_until
from wire.limits import KIB
from wire.messages import AckResult, Receipt, Status, encode
from wire.topics import MessageKind

# Every test that makes sense on both set-ups runs on these two; the session's PostgreSQL and SQLite
# databases are migrated once each.
BOTH = pytest.mark.parametrize(
    ("broker", "migrated_engine"),
    [("embedded_broker", "sqlite"), ("mosquitto", "postgresql")],
    indirect=True,
    ids=["embedded-sqlite", "mosquitto-postgresql"],
)
MOSQUITTO = pytest.mark.parametrize(
    ("broker", "migrated_engine"), [("mosquitto", "postgresql")], indirect=True, ids=["mosquitto-postgresql"]
)
WAIT = 10.0  # seconds: anything the ingest does takes milliseconds; this only bounds a failure


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> RunningBroker:
    """The broker fixture named by the test's parameter."""
    running: RunningBroker = request.getfixturevalue(request.param)
    return running


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def start_ingest(broker: RunningBroker, sessions: sessionmaker[Session]) -> Iterator[Callable[..., Ingest]]:
    """Starts ingests of one shared-subscription group of this test's own; stops and retires them
    afterwards (else the session's mosquitto would queue their share for them for a day)."""
    group = f"test-{secrets.token_hex(4)}"
    started: list[Ingest] = []

    def start(**options: Any) -> Ingest:
        ingest = Ingest(
            broker.cloud,
            sessions,
            name=f"{group}-{len(started)}",
            group=group,
            **{"batch_size": 100, "batch_ms": 20, **options},
        )
        started.append(ingest)
        ingest.start()
        assert ingest.wait_subscribed(WAIT), f"the ingest was not subscribed within {WAIT} s"
        return ingest

    yield start
    for ingest in started:
        ingest.stop()
        assert ingest.retire(), f"{ingest.client_id}'s broker session was not dropped"


@pytest.fixture
def connect(broker: RunningBroker) -> Iterator[Callable[..., ScriptedDevice]]:
    """Connects scripted devices (closed afterwards)."""
    made: list[ScriptedDevice] = []

    def connect_device(fleet: Enrolled, device_id: str, **options: Any) -> ScriptedDevice:
        device = ScriptedDevice(broker.as_device(device_id, fleet.secrets[device_id]), device_id, **options)
        made.append(device)
        return device.connect()

    yield connect_device
    for device in made:
        device.close()
    # A device hears only its own receipts (DESIGN §2's ACL), whatever else the broker holds.
    assert {d.device_id: d.tally.foreign for d in made if d.tally.foreign} == {}


def readings(ingest: Ingest) -> Counter[str]:
    """Every non-zero counter of the ingest, as `name[label]` (counts: whole numbers)."""
    values: Counter[str] = Counter()
    for family in ingest.metrics.registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                name = sample.name.removeprefix("diredi_ingest_").removesuffix("_total")
                label = ",".join(sample.labels.values())
                values[f"{name}[{label}]" if label else name] = int(sample.value)
    return values


def settle(ingest: Ingest, device: ScriptedDevice) -> Counter[str]:
    """Send a heartbeat and wait until it is stored: then the ingest has processed whatever the broker
    delivered to it before (one connection, in order; one writer). The counters at that moment."""
    before = ingest.metrics.value("stored", kind="status")
    device.publish_status()
    wait_until(
        lambda: ingest.metrics.value("stored", kind="status") > before,
        WAIT,
        f"the heartbeat of {device.device_id} was not stored",
    )
    return readings(ingest)


def grew_by(ingest: Ingest, since: Counter[str], expected: dict[str, int]) -> Callable[[], bool]:
    """Whether every counter in `expected` grew at least that much since `since`."""
    return lambda: all(readings(ingest)[k] - since[k] >= n for k, n in expected.items())


def assert_counted(ingest: Ingest, since: Counter[str], expected: dict[str, int]) -> None:
    """Wait until the counters reached `expected` (they move just after the commit and the receipts),
    then check that nothing else moved."""
    wait_until(grew_by(ingest, since, expected), WAIT, lambda: f"counted {readings(ingest) - since}")
    assert readings(ingest) - since == expected


def wait_stored(ingest: Ingest, kind: str, at_least: int) -> None:
    """Wait until the ingest stored `at_least` messages of `kind`."""
    wait_until(
        lambda: ingest.metrics.value("stored", kind=kind) >= at_least,
        WAIT,
        lambda: (
            f"{ingest.client_id} stored {ingest.metrics.value('stored', kind=kind):g} {kind} of {at_least}"
        ),
    )


def device_row(sessions: sessionmaker[Session], device_id: str) -> Device:
    with sessions() as session:
        return session.get_one(Device, device_id)


def telemetry_ids(sessions: sessionmaker[Session], device_id: str) -> set[uuid.UUID]:
    with sessions() as session:
        return set(session.scalars(select(Telemetry.msg_id).where(Telemetry.device_id == device_id)))


def count(sessions: sessionmaker[Session], table: type[object]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


@BOTH
def test_statuses_become_telemetry_and_report_the_model(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    ingest = start_ingest()
    device = connect(fleet, cam)
    before = settle(ingest, device)
    known = telemetry_ids(sessions, cam)

    # Execute
    sent = [
        device.publish_status(model_id=fleet.edge_model, inference_count=i, mean_confidence=0.5)
        for i in range(5)
    ]

    # Assert
    assert_counted(ingest, before, {"received[status]": 5, "stored[status]": 5})
    assert telemetry_ids(sessions, cam) - known == {s.msg_id for s in sent}
    row = device_row(sessions, cam)
    assert row.reported_model_id == fleet.edge_model and row.last_seen is not None


def batches_taken(ingest: Ingest) -> int:
    """How many batches the ingest has taken from the broker."""
    return int(ingest.metrics.registry.get_sample_value("diredi_ingest_batch_bytes_count") or 0)


@BOTH
def test_a_burst_is_taken_in_batches_within_the_byte_budget(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare: batches that would otherwise gather a whole burst (1,000 messages, a second's wait)
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    budget = 4 * KIB
    ingest = start_ingest(batch_size=1000, batch_ms=1000, batch_bytes=budget)
    device = connect(fleet, cam)
    settle(ingest, device)
    stored, taken = ingest.metrics.value("stored", kind="status"), batches_taken(ingest)

    # Execute
    sent = [device.publish_status(model_id=fleet.edge_model, inference_count=i) for i in range(200)]

    # Assert: all stored, in at least as many batches as the budget (plus one message) allows
    wait_stored(ingest, "status", int(stored) + len(sent))
    sizes = [len(encode(status)) for status in sent]
    assert batches_taken(ingest) - taken >= sum(sizes) / (budget + max(sizes))
    assert {s.msg_id for s in sent} <= telemetry_ids(sessions, cam)


@BOTH
def test_a_knowledge_report_is_receipted_only_after_its_row_is_committed(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare: the device looks the report up in the registry the moment its receipt arrives
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    at_receipt: dict[uuid.UUID, KnowledgeStatus | None] = {}

    def look_up(receipt: Receipt) -> None:
        with sessions() as session:
            row = session.get(KnowledgeReport, receipt.ack_of)
            at_receipt[receipt.ack_of] = None if row is None else row.status

    ingest = start_ingest()
    device = connect(fleet, cam, on_receipt=look_up)
    before = settle(ingest, device)
    payload = knowledge_payload(cam, fleet.edge_model)

    # Execute
    msg_id = device.send_report(payload)
    device.wait_all_receipted(WAIT)

    # Assert
    assert at_receipt == {msg_id: KnowledgeStatus.received}
    (receipt,) = device.tally.receipts
    assert (receipt.ack_of, receipt.device_id) == (msg_id, cam)
    with sessions() as session:
        row = session.get_one(KnowledgeReport, msg_id)
        assert (row.device_id, row.base_model_id, row.status) == (
            cam,
            fleet.edge_model,
            KnowledgeStatus.received,
        )
        assert row.payload == payload
    assert device.tally.resends == 0
    assert_counted(ingest, before, {"received[knowledge]": 1, "stored[knowledge]": 1, "receipts": 1})


@BOTH
def test_a_model_ack_is_receipted_and_moves_its_rollout_target(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    with sessions() as session, session.begin():
        rollout = rollouts.create_rollout(session, model_id=fleet.edge_model, waves=[[cam]], created_by="ops")
        rollout_id = rollout.id
    ingest = start_ingest()
    device = connect(fleet, cam)
    before = settle(ingest, device)

    # Execute
    ack = device.send_ack(fleet.edge_model, AckResult.installed)
    device.wait_all_receipted(WAIT)

    # Assert
    assert [r.ack_of for r in device.tally.receipts] == [ack.msg_id]
    with sessions() as session:
        assert session.get_one(RolloutTarget, (rollout_id, cam)).state is TargetState.installed
        assert session.get_one(AckRow, ack.msg_id).result is AckResult.installed
        assert session.get_one(Device, cam).reported_model_id == fleet.edge_model
    assert_counted(ingest, before, {"received[model/ack]": 1, "stored[model/ack]": 1, "receipts": 1})


@BOTH
def test_refused_payloads_are_counted_per_reason_and_write_nothing(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare
    fleet = enrol(sessions, store, broker, 2)
    cam, other = fleet.devices
    ingest = start_ingest()
    device = connect(fleet, cam)
    before = settle(ingest, device)
    rows = (count(sessions, Telemetry), count(sessions, KnowledgeReport), count(sessions, AckRow))
    negative = json.loads(encode(Status(device_id=cam, uptime_s=1.0)))
    negative["uptime_s"] = -1.0
    sent = [
        (MessageKind.STATUS, b'{"schema": "diredi.status/1", "device_id"'),  # not_json
        (MessageKind.STATUS, b"[1, 2, 3]"),  # not_json: not an object
        (MessageKind.STATUS, b'{"pad": "' + b"x" * (8 * KIB) + b'"}'),  # oversized: > 8 KiB
        (MessageKind.KNOWLEDGE, b" " * (256 * KIB + 1)),  # oversized: > 256 KiB
        (MessageKind.KNOWLEDGE, encode(Status(device_id=cam, uptime_s=1.0))),  # schema: a status
        (MessageKind.STATUS, encode(Status(device_id=other, uptime_s=1.0))),  # device_mismatch
        (MessageKind.STATUS, json.dumps(negative).encode()),  # invalid: a negative uptime
        (MessageKind.MODEL_ACK, b'{"schema": "diredi.model-ack/1", "device_id": "' + cam.encode() + b'"}'),
    ]
    expected = {
        "rejected[not_json]": 2,
        "rejected[oversized]": 2,
        "rejected[schema]": 1,
        "rejected[device_mismatch]": 1,
        "rejected[invalid]": 2,
    }

    # Execute
    for kind, payload in sent:
        device.publish_raw(kind, payload)

    # Assert: counted, and the ingest goes on (the heartbeat after them is stored)
    wait_until(grew_by(ingest, before, expected), WAIT, lambda: f"counted {readings(ingest) - before}")
    after = settle(ingest, device)
    assert after - before == expected | {"received[status]": 1, "stored[status]": 1}
    assert (count(sessions, Telemetry) - 1, count(sessions, KnowledgeReport), count(sessions, AckRow)) == rows
    assert device.tally.receipts == []


@BOTH
def test_a_message_from_a_device_the_registry_does_not_know_is_refused(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare: the ghost may log in to the broker, but the registry never heard of it
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    ghost = f"{fleet.cohort}-ghost"
    ghosts = Enrolled(fleet.cohort, fleet.edge_model, {ghost: provisioned_device(broker, ghost)})
    ingest = start_ingest()
    device = connect(fleet, cam)
    before = settle(ingest, device)

    # Execute: its presence (on connecting), a status, a knowledge report and an ack
    intruder = connect(ghosts, ghost, resend_after=60)
    intruder.publish_status()
    intruder.send_report(knowledge_payload(ghost, fleet.edge_model))
    intruder.send_ack(fleet.edge_model)

    # Assert
    expected = {"rejected[refused]": 4}
    wait_until(grew_by(ingest, before, expected), WAIT, lambda: f"counted {readings(ingest) - before}")
    after = settle(ingest, device)
    assert after - before == expected | {
        "received[presence]": 1,
        "received[status]": 2,
        "received[knowledge]": 1,
        "received[model/ack]": 1,
        "stored[status]": 1,
    }
    with sessions() as session:
        assert session.get(Device, ghost) is None
        assert session.scalar(select(func.count()).where(Telemetry.device_id == ghost)) == 0
        assert session.scalar(select(func.count()).where(KnowledgeReport.device_id == ghost)) == 0
    assert intruder.tally.receipts == [] and len(intruder.unreceipted()) == 2


@BOTH
def test_presence_goes_offline_by_the_will_when_the_connection_drops(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    start_ingest()
    device = connect(fleet, cam)
    conn = device.conn
    wait_until(
        lambda: device_row(sessions, cam).presence is Shown.online,
        WAIT,
        f"{cam} is not shown online",
    )

    # Execute: the socket closes without a DISCONNECT, as when a device loses power
    device.drop()

    # Assert
    def offline() -> bool:
        row = device_row(sessions, cam)
        return (row.presence, row.presence_conn) == (Shown.offline, conn)

    wait_until(offline, WAIT, lambda: f"{cam} is shown {device_row(sessions, cam).presence}, not offline")


@BOTH
def test_a_connection_that_takes_over_a_hung_one_stays_online(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare: the device hangs with its connection (c1) still open
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    ingest = start_ingest()
    hung = connect(fleet, cam)
    settle(ingest, hung)
    hung.freeze()

    # Execute: it comes back on a new connection (c2) under the same client id; the broker ends c1
    # and may publish c1's will, an `offline` older than c2's `online`
    again = connect(fleet, cam)
    settle(ingest, again)

    # Assert
    row = device_row(sessions, cam)
    assert (row.presence, row.presence_conn) == (Shown.online, again.conn), (hung.conn, again.conn)


@BOTH
def test_a_retained_presence_sent_while_no_ingest_ran_is_applied_when_it_starts(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare: the device connected (its `online` retained) before any ingest subscribed
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    device = connect(fleet, cam)

    # Execute
    start_ingest()

    # Assert
    def online() -> bool:
        row = device_row(sessions, cam)
        return (row.presence, row.presence_conn) == (Shown.online, device.conn)

    wait_until(online, WAIT, lambda: f"{cam} is shown {device_row(sessions, cam).presence}, not online")


@MOSQUITTO
def test_two_ingests_of_one_group_both_apply_every_presence_and_split_the_statuses(
    start_ingest: Callable[..., Ingest],
    connect: Callable[..., ScriptedDevice],
    sessions: sessionmaker[Session],
    store: LocalArtifactStore,
    broker: RunningBroker,
) -> None:
    # Prepare
    fleet = enrol(sessions, store, broker, 1)
    (cam,) = fleet.devices
    first, second = start_ingest(), start_ingest()

    # Execute: online (c1), dropped (c1's will), online again (c2), 20 heartbeats, dropped (c2's will)
    device = connect(fleet, cam)
    device.drop()
    again = connect(fleet, cam)
    conns = (device.conn, again.conn)
    statuses = [again.publish_status(inference_count=i) for i in range(20)]
    wait_until(
        lambda: sum(i.metrics.value("stored", kind="status") for i in (first, second)) >= len(statuses),
        WAIT,
        lambda: f"{len(telemetry_ids(sessions, cam))} of {len(statuses)} statuses stored",
    )
    again.drop()

    # Assert: presence is a plain subscription, so each ingest applied all four messages
    for ingest in (first, second):
        wait_stored(ingest, "presence", 4)
    assert [i.metrics.value("stored", kind="presence") for i in (first, second)] == [4, 4]
    row = device_row(sessions, cam)
    assert (row.presence, row.presence_conn) == (Shown.offline, conns[1])
    # ... and statuses a shared one: each stored once, by one ingest or the other, and both had some
    stored = [ingest.metrics.value("stored", kind="status") for ingest in (first, second)]
    assert sum(stored) == len(statuses) and min(stored) > 0, stored
    assert telemetry_ids(sessions, cam) == {s.msg_id for s in statuses}
