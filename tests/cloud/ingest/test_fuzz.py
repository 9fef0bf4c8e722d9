"""Ingest fuzz (DESIGN §2): a provisioned device publishes thousands of malformed or hostile payloads on
its own four topics; each is refused and counted under its reason, none writes a row or changes a
device, and the running ingest still stores a valid status afterwards.

Every payload is judged by `wire.decode` before it is sent: one the contract happens to accept is made
invalid, except those built to be valid on the wire yet refused by the registry (`REGISTRY_REFUSES`).
About a minute; `-o log_cli=true --log-cli-level=INFO` shows each run's reasons and kinds of payload.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.ingest.service import Ingest
from cloud.registry import migrate
from cloud.registry.db import make_engine, session_factory
from cloud.registry.tables import Device, KnowledgeReport, ModelAck, Telemetry
from tests.brokers import Probe, RunningBroker, provisioned_device, running_mosquitto
from tests.cloud.factories import make_cohort, make_device
from tests.cloud.ingest.hostile import A, B, Hostile, found_before, hostile
from tests.databases import postgres_admin_url
from tests.embedded_broker import running_embedded_broker
from testsupport.postgres import scratch_database
from wire.errors import Rejection
from wire.messages import Status, encode
from wire.topics import MessageKind, device_topic

log = logging.getLogger(__name__)


# The ingest under test, its broker and registry


@pytest.fixture(scope="module")
def registry() -> Iterator[sessionmaker[Session]]:
    """A migrated PostgreSQL registry of this module's own, with devices A and B (cohort `fuzz`)."""
    with scratch_database(postgres_admin_url(), prefix="diredi_fuzz") as url:
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            sessions = session_factory(engine)
            with sessions() as session, session.begin():
                make_cohort(session, "fuzz")
                make_device(session, A, "fuzz")
                make_device(session, B, "fuzz")
            yield sessions
        finally:
            engine.dispose()


@dataclass(frozen=True)
class Rig:
    """A running ingest, device A connected to its broker, and the registry they share."""

    broker: RunningBroker
    ingest: Ingest
    device: Probe
    sessions: sessionmaker[Session]


@contextmanager
def running_rig(broker: RunningBroker, sessions: sessionmaker[Session]) -> Iterator[Rig]:
    """Device A provisioned on `broker` and connected, and an ingest of its own (client id and group)."""
    secret = provisioned_device(broker, A)
    name = f"fuzz-{secrets.token_hex(4)}"
    ingest = Ingest(broker.cloud, sessions, name=name, group=name)
    ingest.start()
    try:
        assert ingest.wait_subscribed(), "the broker did not take the ingest's subscriptions"
        with Probe(broker.as_device(A, secret), A) as device:
            reason = device.connect()
            assert reason is not None and not reason.is_failure, reason
            yield Rig(broker, ingest, device, sessions)
    finally:
        ingest.stop()
        ingest.retire()  # its persistent session would otherwise collect later tests' messages


@pytest.fixture(scope="module")
def on_mosquitto(tmp_path_factory: pytest.TempPathFactory, registry: sessionmaker[Session]) -> Iterator[Rig]:
    """The rig on a mosquitto of its own with the production configuration (the session's broker
    carries other tests' retained presence and late wills, which this ingest would refuse too)."""
    with (
        running_mosquitto(tmp_path_factory.mktemp("fuzz-mosquitto")) as broker,
        running_rig(broker, registry) as rig,
    ):
        yield rig


@pytest.fixture(scope="module")
def on_embedded(tmp_path_factory: pytest.TempPathFactory, registry: sessionmaker[Session]) -> Iterator[Rig]:
    """The rig on the embedded broker (MQTT 3.1.1, plain subscriptions)."""
    with running_embedded_broker(tmp_path_factory.mktemp("fuzz-embedded")) as broker:
        with running_rig(broker, registry) as rig:
            yield rig


# What the test watches


@dataclass(frozen=True)
class Counted:
    """The ingest's counters: rejections per reason, every rejection sample whatever its label, and
    (kind, count) of the other counters."""

    rejected: Counter[str]
    rejected_total: float
    received: Counter[str]
    stored: Counter[str]
    duplicates: Counter[str]
    receipts: float

    @classmethod
    def of(cls, ingest: Ingest) -> Counted:
        metrics = ingest.metrics
        per_kind = {
            name: Counter({kind.value: metrics.value(name, kind=kind.value) for kind in MessageKind})
            for name in ("received", "stored", "duplicates")
        }
        total = sum(
            sample.value
            for family in metrics.registry.collect()
            if family.name == "diredi_ingest_rejected"
            for sample in family.samples
            if sample.name == "diredi_ingest_rejected_total"
        )
        return cls(
            rejected=Counter({r.value: metrics.value("rejected", reason=r.value) for r in Rejection}),
            rejected_total=total,
            receipts=metrics.value("receipts"),
            **per_kind,
        )

    def since(self, before: Counted) -> Counted:
        """What was counted after `before` (Counters leave the zeros out)."""
        return Counted(*(getattr(self, f.name) - getattr(before, f.name) for f in fields(self)))


@dataclass(frozen=True)
class Stored:
    """Rows of the tables device messages write, and what the registry says of each device."""

    rows: dict[str, int]
    devices: list[tuple[Any, ...]]

    @classmethod
    def of(cls, sessions: sessionmaker[Session]) -> Stored:
        with sessions() as session:
            rows = {
                table.__tablename__: int(session.scalar(select(func.count()).select_from(table)) or 0)
                for table in (Telemetry, KnowledgeReport, ModelAck)
            }
            presence = (Device.presence, Device.presence_conn, Device.presence_at, Device.last_seen)
            shown = select(Device.id, *presence, Device.reported_model_id).order_by(Device.id)
            devices = [tuple(row) for row in session.execute(shown)]
        return cls(rows, devices)


def writer_alive(ingest: Ingest) -> bool:
    """Whether the ingest's writer thread runs."""
    return any(t.name == f"{ingest.client_id}-writer" and t.is_alive() for t in threading.enumerate())


@contextmanager
def thread_errors() -> Iterator[list[str]]:
    """The tracebacks of exceptions that end a thread meanwhile (then passed on to pytest's hook)."""
    errors: list[str] = []
    previous = threading.excepthook

    def record(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        where = "".join(traceback.format_tb(args.exc_traceback)[-3:])
        errors.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}, at\n{where}")
        previous(args)

    threading.excepthook = record
    try:
        yield errors
    finally:
        threading.excepthook = previous


def wait_counted(ingest: Ingest, before: Counted, count: int, timeout: float = 30.0) -> Counted:
    """The counters once `count` more messages were refused, or at the timeout or the writer's end."""
    deadline = time.monotonic() + timeout
    while True:
        now = Counted.of(ingest)
        done = now.rejected_total - before.rejected_total >= count
        if done or time.monotonic() > deadline or not writer_alive(ingest):
            return now
        time.sleep(0.01)


# The fuzz


@dataclass
class Tally:
    """What a fuzz run published, for its summary."""

    examples: int = 0
    payloads: int = 0
    bytes: int = 0
    largest: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)


def fuzz(rig: Rig, *, examples: int, size: int) -> Tally:
    """Publish `examples` batches of `size` hostile payloads as device A, checking after each batch
    that every one was refused and counted under its reason, nothing was written and the writer runs."""
    tally = Tally()
    untouched = Stored.of(rig.sessions)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    @example(found_before())
    @given(st.lists(hostile(), min_size=size, max_size=size))
    def publish_and_check(batch: list[Hostile]) -> None:
        # Prepare
        before = Counted.of(rig.ingest)
        expected = Counter(h.reason.value for h in batch)
        received = Counter(h.kind.value for h in batch if h.reason is Rejection.refused)

        # Execute
        for h in batch:
            reason = rig.device.publish(device_topic(A, h.kind), h.payload, qos=1)
            assert reason is not None and not reason.is_failure, (h, reason)
        counted = wait_counted(rig.ingest, before, len(batch)).since(before)

        # Assert
        sent = dict(Counter(f"{h.label}: {h.reason}" for h in batch))
        assert writer_alive(rig.ingest), f"the ingest's writer thread died: {errors}; batch: {sent}"
        assert counted.rejected_total == len(batch), (counted, sent)
        assert counted.rejected == expected, sent
        assert counted.received == received, sent
        assert (counted.stored, counted.duplicates, counted.receipts) == (Counter(), Counter(), 0), sent
        assert Stored.of(rig.sessions) == untouched, sent
        tally.examples += len(batch) == size  # not the explicit example
        tally.payloads += len(batch)
        tally.bytes += sum(len(h.payload) for h in batch)
        tally.largest = max(tally.largest, *(len(h.payload) for h in batch))
        tally.reasons.update(expected)
        tally.labels.update(h.label.partition(" (")[0] for h in batch)

    started = time.monotonic()
    with thread_errors() as errors:
        publish_and_check()
    log.info(
        "fuzz on %s: %d examples, %d payloads, %.1f MB (largest %d B) in %.1f s; reasons %s; payloads %s",
        rig.broker.kind,
        tally.examples,
        tally.payloads,
        tally.bytes / 1e6,
        tally.largest,
        time.monotonic() - started,
        dict(tally.reasons.most_common()),
        dict(tally.labels.most_common()),
    )
    return tally


def assert_a_valid_status_is_still_stored(rig: Rig) -> None:
    """The ingest still works: a valid status of device A becomes a telemetry row."""
    status = Status(device_id=A, uptime_s=42.0, inference_count=7)
    before = Counted.of(rig.ingest)
    assert rig.device.publish(device_topic(A, MessageKind.STATUS), encode(status), qos=1) is not None
    deadline = time.monotonic() + 10
    while Counted.of(rig.ingest).since(before).stored != Counter({"status": 1}):
        assert time.monotonic() < deadline, Counted.of(rig.ingest).since(before)
        time.sleep(0.01)
    with rig.sessions() as session:
        stored = session.scalars(select(Telemetry.msg_id).where(Telemetry.device_id == A)).all()
    assert status.msg_id in stored


def test_ten_thousand_hostile_payloads_on_mosquitto_are_each_refused_and_counted(on_mosquitto: Rig) -> None:
    # Execute / Assert: every batch is checked as it goes
    tally = fuzz(on_mosquitto, examples=100, size=100)

    # Assert
    assert tally.payloads >= 10_000
    assert set(tally.reasons) == set(Rejection) - {Rejection.topic}  # a device may publish on its topics only
    assert_a_valid_status_is_still_stored(on_mosquitto)


def test_a_thousand_hostile_payloads_on_the_embedded_broker_are_each_refused_and_counted(
    on_embedded: Rig,
) -> None:
    # Execute / Assert
    tally = fuzz(on_embedded, examples=10, size=100)

    # Assert
    assert tally.payloads >= 1_000
    assert_a_valid_status_is_still_stored(on_embedded)
