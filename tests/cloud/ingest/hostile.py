"""The hostile payloads of the ingest fuzz (test_fuzz.py): each built on a device's own topics, judged
by `wire.decode` before it is sent, labelled with what it tries."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

from tests.brokers import new_device_id
from tests.cloud.factories import knowledge_payload
from tests.wire.message_cases import json_values, payload_of, valid_doc
from wire.arrays import EncodedArray
from wire.errors import ContractError, Rejection
from wire.limits import max_payload_bytes
from wire.messages import SCHEMAS, AckResult, decode
from wire.topics import DEVICE_PUBLISHES, MessageKind, device_topic

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
