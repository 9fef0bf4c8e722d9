"""Ingest fuzz (DESIGN §2): a provisioned device publishes thousands of malformed or hostile payloads on
its own four topics; each is refused and counted under its reason, none writes a row or changes a
device, and the running ingest still stores a valid status afterwards.

Every payload is judged by `wire.decode` before it is sent: one the contract happens to accept is made
invalid, except those built to be valid on the wire yet refused by the registry (`REGISTRY_REFUSES`).
About a minute; `-o log_cli=true --log-cli-level=INFO` shows each run's reasons and kinds of payload.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.ingest.service import Ingest
from cloud.registry import migrate
from cloud.registry.db import make_engine, session_factory
from cloud.registry.tables import Device, KnowledgeReport, ModelAck, Telemetry
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device, running_mosquitto
from tests.cloud.factories import knowledge_payload, make_cohort, make_device
from tests.databases import postgres_admin_url
from tests.embedded_broker import running_embedded_broker
from tests.wire.message_cases import json_values, payload_of, valid_doc
from testsupport.postgres import scratch_database
from wire.arrays import EncodedArray
from wire.errors import ContractError, Rejection
from wire.limits import max_payload_bytes
from wire.messages import SCHEMAS, AckResult, Status, decode, encode
from wire.topics import DEVICE_PUBLISHES, MessageKind, device_topic

log = logging.getLogger(__name__)

A, B = new_device_id("fuzz"), new_device_id("fuzz")  # A publishes; B is a registered device it imitates
KINDS = st.sampled_from(DEVICE_PUBLISHES)
# mosquitto ends the connection of a packet over max_packet_size (266,240 B, topic and header included).
MAX_PUBLISH = 265_000  # room for the topic, the header and a field name longer than "surplus"
RAW = "@@raw@@"  # a placeholder value, replaced by raw JSON text in the serialised document
# Valid on the wire, not storable in the registry (on PostgreSQL): the ingest must count them as
# `refused` (labelled_count was; the contract now bounds it, and decode refuses it as `invalid`).
REGISTRY_REFUSES = frozenset(
    {
        "report on an unknown base model",
        "NUL in an ack reason",
        "labelled_count over int4",
        "sent_at beyond UTC",
    }
)


@dataclass(frozen=True, repr=False)
class Hostile:
    """One payload for device A's topic of `kind`, what it is, and the reason it must be refused for."""

    kind: MessageKind
    payload: bytes
    label: str
    reason: Rejection

    def __repr__(self) -> str:  # short: a falsifying example holds up to 100 of them
        head = self.payload[:60]
        return f"Hostile({self.label!r}, {self.kind}, {len(self.payload)} B, {self.reason}, {head!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def valid(kind: MessageKind, device_id: str = A) -> dict[str, Any]:
    """A valid document of `kind` from `device_id`, every optional field set, as a fresh dict."""
    return valid_doc(kind) | {"device_id": device_id}


def judged(kind: MessageKind, payload: bytes, label: str) -> Hostile:
    """`payload` with the reason it must be refused for; one the contract accepts by chance (a
    replaced field that happened to be valid) is given a field the contract does not know."""
    try:
        decode(device_topic(A, kind), payload)
    except ContractError as error:
        return Hostile(kind, payload, label, error.reason)
    except Exception as error:  # a bug of decode: the ingest must refuse the payload all the same
        return Hostile(kind, payload, f"{label} (decode raised {type(error).__name__})", Rejection.invalid)
    if label in REGISTRY_REFUSES:
        return Hostile(kind, payload, label, Rejection.refused)
    payload = payload_of(json.loads(payload) | {"fuzz-unknown-field": True})
    with pytest.raises(ContractError) as refused:
        decode(device_topic(A, kind), payload)
    return Hostile(kind, payload, f"{label}, plus an unknown field", refused.value.reason)


def with_raw(doc: dict[str, Any], field: str, raw: bytes) -> bytes:
    """`doc` serialised with `field` set to the JSON text `raw`, which need not be valid JSON."""
    return payload_of(doc | {field: RAW}).replace(f'"{RAW}"'.encode(), raw, 1)


def fields_of(kind: MessageKind) -> st.SearchStrategy[str]:
    """A field of `kind`'s valid document, or a new one."""
    return st.sampled_from(sorted(valid(kind))) | st.just("surplus")


# Strategies: one per way a payload can be wrong, each a Hostile.

WRONG_TYPES = [None, True, 0, -1, 1.5, "", "x", [], [1], {}, {"a": 1}]
NOT_UTF8 = [b"\xff", b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80"]
# Floats beyond double, integers beyond Python's 4,300-digit parsing limit or any column.
HUGE_NUMBERS = [b"1e400", b"-1e400", b"1e-400", b"1E+99999", b"9" * 5000, b"-" + b"9" * 4301]
HUGE_NUMBERS.append(b"1" + b"0" * 400)


@st.composite
def byte_soup(draw: st.DrawFn) -> Hostile:
    return judged(draw(KINDS), draw(st.binary(max_size=400)), "byte soup")


@st.composite
def not_utf8(draw: st.DrawFn) -> Hostile:
    kind = draw(KINDS)
    encoding = draw(st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1", "spliced"]))
    if encoding == "latin-1":
        doc = valid(kind) | {draw(fields_of(kind)): "café ÿ"}
        payload = json.dumps(doc, ensure_ascii=False).encode("latin-1")
    elif encoding == "spliced":
        payload = payload_of(valid(kind))
        at = draw(st.integers(0, len(payload)))
        payload = payload[:at] + draw(st.sampled_from(NOT_UTF8)) + payload[at:]
    else:
        payload = json.dumps(valid(kind)).encode(encoding)
    return judged(kind, payload, f"not UTF-8 ({encoding})")


@st.composite
def truncated(draw: st.DrawFn) -> Hostile:
    kind = draw(KINDS)
    payload = payload_of(valid(kind))
    return judged(kind, payload[: draw(st.integers(0, len(payload) - 1))], "truncated JSON")


@st.composite
def wrong_top_level(draw: st.DrawFn) -> Hostile:
    kind = draw(KINDS)
    doc = valid(kind)
    shapes = [[doc], payload_of(doc).decode(), [], "", 0, -1.5, None, True, [doc, doc]]
    return judged(kind, payload_of(draw(st.sampled_from(shapes))), "JSON of the wrong top-level type")


@st.composite
def wrong_type(draw: st.DrawFn) -> Hostile:
    kind = draw(KINDS)
    value = draw(st.sampled_from(WRONG_TYPES) | json_values)
    return judged(kind, payload_of(valid(kind) | {draw(fields_of(kind)): value}), "a field of the wrong type")


@st.composite
def not_a_number(draw: st.DrawFn) -> Hostile:
    kind = draw(KINDS)
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf, [1.0, math.nan], {"0": math.inf}]))
    return judged(kind, json.dumps(valid(kind) | {draw(fields_of(kind)): value}).encode(), "NaN or Infinity")


@st.composite
def huge_number(draw: st.DrawFn) -> Hostile:
    kind = draw(KINDS)
    raw = draw(st.sampled_from(HUGE_NUMBERS))
    return judged(kind, with_raw(valid(kind), draw(fields_of(kind)), raw), "a number out of any range")


@st.composite
def huge_array(draw: st.DrawFn) -> Hostile:
    """An array of thousands of elements in a field, within the kind's limit or up to the broker's."""
    kind = draw(KINDS)
    element = draw(st.sampled_from([b"0", b"1e308", b'"x"', b"null", b"{}", b"[]", b"-1"]))
    base = len(with_raw(valid(kind), "surplus", b""))
    room = (max_payload_bytes(kind) if draw(st.booleans()) else MAX_PUBLISH) - base
    count = draw(st.integers(1_000, max(1_000, room // (len(element) + 1))))
    raw = b"[" + b",".join([element] * count) + b"]"
    return judged(kind, with_raw(valid(kind), draw(fields_of(kind)), raw), "a huge array")


@st.composite
def huge_report(draw: st.DrawFn) -> Hostile:
    """A knowledge report of up to C=200 classes whose arrays are consistent but for one flaw."""
    c, d = draw(st.integers(2, 200)), draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    counts = rng.integers(0, 50, size=(c, c), dtype=np.int32)
    weight = rng.normal(0, 0.05, size=(c, d))
    flaw = draw(st.sampled_from(["sample_count", "negative count", "NaN delta", "shape", "float32 map"]))
    sample_count = int(counts.sum()) + (flaw == "sample_count")
    if flaw == "negative count":
        counts[0, 0] = -1
        sample_count = int(counts.sum())
    if flaw == "NaN delta":
        weight[0, 0] = math.nan
    doc = valid(MessageKind.KNOWLEDGE) | {
        "num_classes": c,
        "feature_dim": d,
        "sample_count": sample_count,
        "preference_map": EncodedArray.from_numpy(counts, "float32" if flaw == "float32 map" else "int32"),
        "delta_weight": EncodedArray.from_numpy(weight if flaw != "shape" else weight[:, :-1], "float16"),
        "delta_bias": EncodedArray.from_numpy(np.zeros(c), "float16"),
    }
    doc = {k: v.model_dump() if isinstance(v, EncodedArray) else v for k, v in doc.items()}
    return judged(MessageKind.KNOWLEDGE, payload_of(doc), f"a huge knowledge report ({flaw})")


@st.composite
def deep_nesting(draw: st.DrawFn) -> Hostile:
    """Arrays or objects nested as deep as the kind's limit (or the broker's) allows, at the top or in
    a field."""
    kind = draw(KINDS)
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    limit = max_payload_bytes(kind) if draw(st.booleans()) else MAX_PUBLISH
    depth = draw(st.integers(1, (limit - 1_500) // (len(opener) + len(closer))))
    raw = opener * depth + b"0" + closer * depth
    if draw(st.booleans()):
        return judged(kind, raw, "deep nesting at the top")
    return judged(kind, with_raw(valid(kind), draw(fields_of(kind)), raw), "deep nesting in a field")


@st.composite
def wrong_schema(draw: st.DrawFn) -> Hostile:
    kind = draw(KINDS)
    right = SCHEMAS[kind]
    others = [s for k, s in SCHEMAS.items() if k is not kind]
    near = [right.upper(), f"{right} ", right[:-1] + "2", right[:-1] + "01", right + "\x00", "\u200b" + right]
    doc = valid(kind)
    if draw(st.booleans()):
        del doc["schema"]
    else:
        doc["schema"] = draw(st.sampled_from(others + near + [None, 1, [right], {"schema": right}]))
    return judged(kind, payload_of(doc), "a wrong or missing schema")


@st.composite
def other_device(draw: st.DrawFn) -> Hostile:
    """Another device's id: B's (its own valid message, on A's topic), a look-alike of A's, or no id."""
    kind = draw(KINDS)
    doc = valid(kind, B)
    lookalike = [A.upper(), f"{A} ", f" {A}", f"{A}\n", A + "\x00", A.replace("f", "\u0192"), None, 1, [A]]
    choice = draw(st.sampled_from(["B", "random", "lookalike", "missing"]))
    if choice == "random":
        doc["device_id"] = draw(
            st.from_regex(r"[a-z0-9][a-z0-9-]{2,62}", fullmatch=True).filter(lambda d: d != A)
        )
    elif choice == "lookalike":
        doc["device_id"] = draw(st.sampled_from(lookalike))
    elif choice == "missing":
        del doc["device_id"]
    return judged(kind, payload_of(doc), f"device_id of another device ({choice})")


@st.composite
def extra_field(draw: st.DrawFn) -> Hostile:
    kind = draw(KINDS)
    doc = valid(kind)
    name = draw(st.text(max_size=20).filter(lambda n: n not in doc))
    return judged(kind, payload_of(doc | {name: draw(json_values)}), "an extra field")


@st.composite
def duplicate_key(draw: st.DrawFn) -> Hostile:
    """A valid document followed by a second value for one of its keys (JSON keeps the last)."""
    kind = draw(KINDS)
    key = draw(st.sampled_from(["device_id", "schema", "msg_id", "sent_at"]))
    value = draw(st.sampled_from([B, SCHEMAS[MessageKind.STATUS], "not-a-uuid", "yesterday", None]))
    payload = payload_of(valid(kind))
    return judged(kind, payload[:-1] + b"," + payload_of({key: value})[1:], "a duplicate key")


@st.composite
def oversized(draw: st.DrawFn) -> Hostile:
    """A valid document padded with whitespace to just over the kind's limit (and under the broker's)."""
    kind = draw(KINDS)
    limit = max_payload_bytes(kind)
    payload = payload_of(valid(kind))
    size = draw(st.integers(limit + 1, min(2 * limit, MAX_PUBLISH)))
    padding = draw(st.sampled_from([b" ", b"\n", b"\t", b"\r\n"]))
    pad = (padding * (size - len(payload)))[: size - len(payload)]
    return judged(kind, payload[:1] + pad + payload[1:], "oversized")


@st.composite
def wrong_topic(draw: st.DrawFn) -> Hostile:
    """A valid message of one kind on the topic of another."""
    sent, topic = draw(st.permutations(DEVICE_PUBLISHES))[:2]
    return judged(topic, payload_of(valid(sent)), f"another kind's message ({sent} on {topic})")


@st.composite
def registry_refuses(draw: st.DrawFn) -> Hostile:
    """Valid on the wire, not storable: the ingest must refuse it and go on."""
    which = draw(st.sampled_from(sorted(REGISTRY_REFUSES)))
    if which == "report on an unknown base model":
        model = draw(st.from_regex(r"[a-z][a-z0-9]{0,15}\.v[1-9][0-9]{0,3}", fullmatch=True))
        return judged(MessageKind.KNOWLEDGE, knowledge_payload(A, model), which)
    if which == "NUL in an ack reason":
        reason = draw(st.text(max_size=40)) + "\x00" + draw(st.text(max_size=40))
        doc = valid(MessageKind.MODEL_ACK) | {"result": AckResult.failed, "reason": reason}
        return judged(MessageKind.MODEL_ACK, payload_of(doc), which)
    if which == "labelled_count over int4":
        doc = valid(MessageKind.STATUS) | {"labelled_count": draw(st.integers(2**31, 2**63 - 1))}
        return judged(MessageKind.STATUS, payload_of(doc), which)
    kind = draw(st.sampled_from([MessageKind.STATUS, MessageKind.PRESENCE, MessageKind.MODEL_ACK]))
    hours = draw(st.integers(1, 23))
    sent_at = draw(
        st.sampled_from([f"9999-12-31T23:59:59-{hours:02}:00", f"0001-01-01T00:00:00+{hours:02}:00"])
    )
    return judged(kind, payload_of(valid(kind) | {"sent_at": sent_at}), which)


def found_before() -> list[Hostile]:
    """Payloads this fuzz found to break the ingest once, tried first on every run."""
    report, status = valid(MessageKind.KNOWLEDGE), valid(MessageKind.STATUS)
    return [
        judged(
            MessageKind.KNOWLEDGE, with_raw(report, "sample_count", b"1" + b"0" * 400), "a huge sample_count"
        ),
        judged(
            MessageKind.STATUS,
            payload_of(status | {"sent_at": "0001-01-01T00:00:00+01:00"}),
            "sent_at beyond UTC",
        ),
    ]


def hostile() -> st.SearchStrategy[Hostile]:
    """Any of the hostile payloads above."""
    return st.one_of(
        wrong_type(), byte_soup(), not_utf8(), truncated(), wrong_top_level(), not_a_number(),
        huge_number(), huge_array(), huge_report(), deep_nesting(), wrong_schema(), other_device(),
        extra_field(), duplicate_key(), oversized(), wrong_topic(), registry_refuses(),
    ).filter(lambda h: len(h.payload) <= MAX_PUBLISH)  # fmt: skip  # (mosquitto drops a larger sender)


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
