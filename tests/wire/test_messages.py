"""wire.encode / decode: every message kind round-trips on its topic; every rejection has one reason."""

from __future__ import annotations

import json
import uuid
from functools import cache
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire.test_desired import key_id_of, public_raw, sign
from tests.wire.test_knowledge import make_counts, make_report
from wire import (
    DEVICE_ID_PATTERN,
    AckResult,
    Command,
    CommandName,
    ContractError,
    DesiredModel,
    KnowledgeReport,
    Message,
    MessageKind,
    ModelAck,
    Presence,
    PresenceState,
    Receipt,
    Rejection,
    Status,
    decode,
    device_topic,
    encode,
    parse_device_topic,
)
from wire.desired import verify_raw
from wire.messages import MAX_HISTOGRAM_CLASSES, MAX_NESTING

DEVICE = "dev-1"
KEY = Ed25519PrivateKey.generate()
KIB = 1024
# DESIGN §2, spelled out here so that a changed limit in wire.limits fails a test.
LIMITS = {
    MessageKind.PRESENCE: 16 * KIB,
    MessageKind.STATUS: 8 * KIB,
    MessageKind.KNOWLEDGE: 256 * KIB,
    MessageKind.MODEL_ACK: 16 * KIB,
    MessageKind.MODEL_DESIRED: 16 * KIB,
    MessageKind.RECEIPT: 16 * KIB,
    MessageKind.CMD: 16 * KIB,
}
SCHEMAS = {
    MessageKind.PRESENCE: "diredi.presence/1",
    MessageKind.STATUS: "diredi.status/1",
    MessageKind.KNOWLEDGE: "diredi.knowledge/1",
    MessageKind.MODEL_ACK: "diredi.model-ack/1",
    MessageKind.MODEL_DESIRED: "diredi.desired/1",
    MessageKind.RECEIPT: "diredi.receipt/1",
    MessageKind.CMD: "diredi.cmd/1",
}
TYPES: dict[MessageKind, type[Message]] = {
    MessageKind.PRESENCE: Presence,
    MessageKind.STATUS: Status,
    MessageKind.KNOWLEDGE: KnowledgeReport,
    MessageKind.MODEL_ACK: ModelAck,
    MessageKind.MODEL_DESIRED: DesiredModel,
    MessageKind.RECEIPT: Receipt,
    MessageKind.CMD: Command,
}
MARK = "Z" * 5000  # attacker input: no error may quote more than ~120 characters of it
ECHO = "Z" * 121

Doc = dict[str, Any]


def make_message(kind: MessageKind) -> Message:
    """A valid message of `kind` from DEVICE, with every optional field set where there is one."""
    if kind is MessageKind.PRESENCE:
        return Presence(device_id=DEVICE, state=PresenceState.online, conn="c-7f3a.2")
    if kind is MessageKind.STATUS:
        return Status(
            device_id=DEVICE,
            model_id="base.v1",
            uptime_s=3600.5,
            inference_count=1234,
            latency_p50_ms=4.25,
            latency_p95_ms=9.5,
            mean_confidence=0.875,
            class_histogram={"0": 1000, "3": 200, "9": 34},
            labelled_count=40,
            accuracy=0.9,
            cpu_percent=37.5,
            mem_bytes=48 << 20,
            temp_c=-5.5,
        )
    if kind is MessageKind.KNOWLEDGE:
        return make_report(device_id=DEVICE)
    if kind is MessageKind.MODEL_ACK:
        return ModelAck(
            device_id=DEVICE,
            model_id="kitchen.v2",
            result=AckResult.failed,
            reason="sha256 of the download does not match the manifest",
            running_model_id="kitchen.v1",
        )
    if kind is MessageKind.MODEL_DESIRED:
        return sign(KEY, device_id=DEVICE, rollback_of="kitchen.v3")
    if kind is MessageKind.RECEIPT:
        return Receipt(device_id=DEVICE, ack_of=uuid.uuid4())
    return Command(device_id=DEVICE, command=CommandName.run_rd)


@cache
def _valid_payload(kind: MessageKind) -> bytes:
    return encode(make_message(kind))


def valid_doc(kind: MessageKind) -> Doc:
    """The JSON document of a valid message of `kind`, as a fresh dict to corrupt."""
    doc: Doc = json.loads(_valid_payload(kind))
    return doc


def payload_of(doc: Any) -> bytes:
    """Compact JSON, as a device would send it."""
    return json.dumps(doc, separators=(",", ":")).encode()


def topic_of(kind: MessageKind) -> str:
    return device_topic(DEVICE, kind)


def refusal(topic: str, payload: bytes) -> ContractError:
    """The ContractError `decode` raises; fails the test if it returns a message."""
    with pytest.raises(ContractError) as caught:
        decode(topic, payload)
    return caught.value


def assert_bounded(error: ContractError) -> None:
    """The error quotes at most ~120 characters of the sender's text and cannot forge a log line."""
    text = str(error)
    assert ECHO not in text
    assert len(text) <= 400
    assert text.isprintable()


# Round trips


@pytest.mark.parametrize("kind", list(MessageKind))
def test_every_kind_round_trips_on_its_own_topic(kind: MessageKind) -> None:
    # Prepare
    message = make_message(kind)

    # Execute
    decoded_kind, decoded = decode(topic_of(kind), encode(message))

    # Assert
    assert decoded_kind is kind
    assert type(decoded) is TYPES[kind]
    assert decoded == message


@pytest.mark.parametrize("kind", list(MessageKind))
def test_the_wire_form_carries_the_envelope_under_its_contract_names(kind: MessageKind) -> None:
    # Execute
    doc = json.loads(encode(make_message(kind)))

    # Assert
    assert doc["schema"] == SCHEMAS[kind]
    assert "schema_" not in doc
    assert doc["device_id"] == DEVICE
    if kind is not MessageKind.MODEL_DESIRED:  # the desired model has issued_at, not the envelope
        assert uuid.UUID(doc["msg_id"])
        assert doc["sent_at"].endswith("Z")


def test_a_decoded_knowledge_report_keeps_its_arrays() -> None:
    # Prepare
    report = make_report(device_id=DEVICE)

    # Execute
    _, decoded = decode(topic_of(MessageKind.KNOWLEDGE), encode(report))

    # Assert
    assert isinstance(decoded, KnowledgeReport)
    np.testing.assert_array_equal(decoded.counts(), make_counts())
    np.testing.assert_array_equal(decoded.head_delta()[0], report.head_delta()[0])


def test_a_decoded_desired_model_still_verifies() -> None:
    # Prepare
    payload = encode(sign(KEY, device_id=DEVICE))
    trusted = {key_id_of(KEY): public_raw(KEY)}

    # Execute
    _, decoded = decode(topic_of(MessageKind.MODEL_DESIRED), payload)

    # Assert
    assert isinstance(decoded, DesiredModel)
    decoded.verify(trusted)
    assert verify_raw(payload, trusted) == decoded


# Rejection.topic


@pytest.mark.parametrize(
    "topic",
    [
        "diredi/v1/dev/dev-1/telemetry",
        "diredi/v1/dev/dev-1/model",
        "diredi/v1/dev/dev-1/model/ack/extra",
        "diredi/v1/dev/dev-1/status/",
        "diredi/v1/dev/dev-1",
        "diredi/v1/dev/+/status",
        "diredi/v1/dev/dev-1/+",
        "diredi/v1/dev/#",
        "diredi/v1/#",
        "$share/ingest/diredi/v1/dev/+/status",
        "$SYS/broker/uptime",
        "diredi/v2/dev/dev-1/status",
        "/diredi/v1/dev/dev-1/status",
        "DIREDI/v1/dev/dev-1/status",
        "diredi/v1/dev/DEV-1/status",
        "diredi/v1/dev/d1/status",
        "",
    ],
)
def test_a_topic_outside_the_contract_is_refused_for_topic(topic: str) -> None:
    # Prepare: a payload that would be valid on the status topic
    payload = _valid_payload(MessageKind.STATUS)

    # Execute
    error = refusal(topic, payload)

    # Assert
    assert error.reason is Rejection.topic
    assert "topic" in str(error) or "device_id" in str(error)


def test_the_topic_is_checked_before_the_payload() -> None:
    # Prepare: oversized garbage on a wildcard topic
    payload = b"\xff" * (1 << 20)

    # Execute
    error = refusal("diredi/v1/dev/+/knowledge", payload)

    # Assert
    assert error.reason is Rejection.topic


@pytest.mark.parametrize(
    "topic",
    [
        MARK,
        f"diredi/v1/dev/{MARK}/status",
        f"diredi/v1/dev/dev-1/{MARK}",
        f"diredi/v1/dev/dev-1/status\n{MARK}",
    ],
    ids=["prefix", "device-id", "suffix", "newline"],
)
def test_a_topic_error_quotes_little_of_the_topic(topic: str) -> None:
    # Execute
    error = refusal(topic, b"{}")

    # Assert
    assert error.reason is Rejection.topic
    assert_bounded(error)


# Rejection.oversized


@pytest.mark.parametrize("kind", list(MessageKind))
def test_one_byte_over_the_limit_is_oversized(kind: MessageKind) -> None:
    # Prepare: trailing whitespace keeps the JSON valid, so only the size is wrong
    payload = _valid_payload(kind)
    over = payload + b" " * (LIMITS[kind] + 1 - len(payload))

    # Execute
    error = refusal(topic_of(kind), over)

    # Assert
    assert error.reason is Rejection.oversized
    assert str(LIMITS[kind]) in str(error)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_a_payload_exactly_at_the_limit_is_accepted(kind: MessageKind) -> None:
    # Prepare
    payload = _valid_payload(kind)
    padded = payload + b" " * (LIMITS[kind] - len(payload))
    assert len(padded) == LIMITS[kind]

    # Execute
    decoded_kind, decoded = decode(topic_of(kind), padded)

    # Assert
    assert decoded_kind is kind
    assert encode(decoded) == payload


@pytest.mark.parametrize("kind", list(MessageKind))
def test_garbage_at_the_limit_is_not_json_and_one_byte_more_is_oversized(kind: MessageKind) -> None:
    # Prepare
    at_limit = b"\xff" * LIMITS[kind]

    # Execute
    at = refusal(topic_of(kind), at_limit)
    over = refusal(topic_of(kind), at_limit + b"\xff")

    # Assert
    assert at.reason is Rejection.not_json
    assert over.reason is Rejection.oversized


# Rejection.not_json

STATUS_TEXT = _valid_payload(MessageKind.STATUS).decode()
NOT_JSON = {
    "empty": b"",
    "blank": b"  \n ",
    "not-utf8": b"\xff\xfe\xfd",
    "lone-continuation-byte": b"\x80",
    "latin1-in-a-string": STATUS_TEXT.replace('"base.v1"', '"base.v\xe9"').encode("latin-1"),
    "utf16": STATUS_TEXT.encode("utf-16"),
    "utf16-le-without-bom": STATUS_TEXT.encode("utf-16-le"),
    "utf32": STATUS_TEXT.encode("utf-32"),
    "utf8-bom": b"\xef\xbb\xbf" + STATUS_TEXT.encode(),
    "words": b"not json",
    "truncated": STATUS_TEXT[:-1].encode(),
    "trailing-data": STATUS_TEXT.encode() + b"{}",
    "single-quotes": STATUS_TEXT.replace('"', "'").encode(),
    "array": b"[]",
    "array-of-the-object": f"[{STATUS_TEXT}]".encode(),
    "number": b"12",
    "negative-float": b"-0.5",
    "string": b'"status"',
    "null": b"null",
    "true": b"true",
    "nan": b"NaN",
    "infinity": b"Infinity",
    "minus-infinity": b"-Infinity",
    "nan-in-a-field": STATUS_TEXT.replace('"uptime_s":3600.5', '"uptime_s":NaN').encode(),
    "infinity-in-a-field": STATUS_TEXT.replace('"temp_c":-5.5', '"temp_c":Infinity').encode(),
    "minus-infinity-in-a-field": STATUS_TEXT.replace('"temp_c":-5.5', '"temp_c":-Infinity').encode(),
    "nan-in-the-histogram": STATUS_TEXT.replace('"9":34', '"9":NaN').encode(),
    "nan-in-an-unknown-field": STATUS_TEXT[:-1].encode() + b',"extra":[1,[2,{"x":NaN}]]}',
    "nan-as-schema": b'{"schema":NaN}',
    "nan-before-the-schema": b'{"x":-Infinity,"schema":"diredi.status/1"}',
    "nested-arrays": b"[" * 4096 + b"]" * 4096,
    "nested-objects": b'{"a":' * 1300 + b"1" + b"}" * 1300,
    "nested-in-the-schema": b'{"schema":' + b"[" * 4000 + b"]" * 4000 + b"}",
    "nested-in-a-field": STATUS_TEXT[:-1].encode() + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
    "too-many-digits": STATUS_TEXT.replace(
        '"inference_count":1234', '"inference_count":' + "9" * 5000
    ).encode(),
}


@pytest.mark.parametrize("payload", NOT_JSON.values(), ids=NOT_JSON.keys())
def test_a_payload_that_is_not_a_utf8_json_object_is_refused_for_not_json(payload: bytes) -> None:
    # Prepare
    assert len(payload) <= LIMITS[MessageKind.STATUS]

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload)

    # Assert
    assert error.reason is Rejection.not_json
    assert "status payload is not" in str(error)
    assert_bounded(error)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_nesting_as_deep_as_the_limit_allows_is_not_json(kind: MessageKind) -> None:
    # Prepare: the deepest document that fits; the parser's RecursionError must not escape
    depth = LIMITS[kind] // 2

    # Execute
    arrays = refusal(topic_of(kind), b"[" * depth + b"]" * depth)
    in_schema = refusal(topic_of(kind), b'{"schema":' + b"[" * (depth - 6) + b"]" * (depth - 6) + b"}")

    # Assert
    assert arrays.reason is Rejection.not_json
    assert in_schema.reason is Rejection.not_json


@pytest.mark.parametrize("depth", [10, MAX_NESTING - 1])  # inside the message's own object
def test_moderate_nesting_is_parsed_and_refused_for_what_it_holds(depth: int) -> None:
    # Prepare
    nested = b"[" * depth + b"]" * depth
    topic = topic_of(MessageKind.STATUS)

    # Execute
    as_schema = refusal(topic, b'{"schema":' + nested + b"}")
    as_device = refusal(topic, b'{"schema":"diredi.status/1","device_id":' + nested + b"}")
    as_field = refusal(topic, STATUS_TEXT[:-1].encode() + b',"uptime_s":' + nested + b"}")

    # Assert
    assert as_schema.reason is Rejection.schema
    assert as_device.reason is Rejection.device_mismatch
    assert as_field.reason is Rejection.invalid
    for error in (as_schema, as_device, as_field):
        assert_bounded(error)


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (b"", Rejection.not_json),
        (b'{"schema":', Rejection.schema),
        (b'{"schema":"diredi.status/1","device_id":', Rejection.device_mismatch),
        (STATUS_TEXT[:-1].encode() + b',"uptime_s":', Rejection.invalid),
    ],
    ids=["alone", "schema", "device-id", "field"],
)
def test_no_nesting_depth_lets_another_exception_escape(prefix: bytes, reason: Rejection) -> None:
    # Prepare: around the interpreter's recursion limit, where parsing, repr and validation could differ
    suffix = b"" if not prefix else b"}"
    payloads = {d: prefix + b"[" * d + b"]" * d + suffix for d in range(1, 1400, 3)}

    # Execute
    reasons = {d: refusal(topic_of(MessageKind.STATUS), p).reason for d, p in payloads.items()}

    # Assert
    assert set(reasons.values()) <= {reason, Rejection.not_json}
    assert reasons[1] is reason
    assert reasons[1399] is Rejection.not_json


def test_nan_as_a_string_is_valid_json_but_not_a_valid_number() -> None:
    # Prepare
    doc = valid_doc(MessageKind.STATUS)
    doc["uptime_s"] = "NaN"

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload_of(doc))

    # Assert
    assert error.reason is Rejection.invalid
    assert "uptime_s" in str(error)


@pytest.mark.parametrize("field", ["uptime_s", "latency_p95_ms", "mean_confidence", "temp_c", "cpu_percent"])
def test_a_number_too_large_for_a_float_is_invalid(field: str) -> None:
    # Prepare: 1e999 is valid JSON that Python parses to inf
    doc = valid_doc(MessageKind.STATUS)
    del doc[field]
    payload = payload_of(doc)[:-1] + f',"{field}":1e999}}'.encode()

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload)

    # Assert
    assert error.reason is Rejection.invalid
    assert field in str(error)


# Rejection.schema


@pytest.mark.parametrize(
    ("kind", "sent"), [(kind, sent) for kind in MessageKind for sent in MessageKind if kind is not sent]
)
def test_a_payload_of_another_kind_is_refused_for_schema(kind: MessageKind, sent: MessageKind) -> None:
    # Prepare: e.g. a valid status payload published on the presence topic
    payload = _valid_payload(sent)
    assert len(payload) <= LIMITS[kind]

    # Execute
    error = refusal(topic_of(kind), payload)

    # Assert
    assert error.reason is Rejection.schema
    assert "schema" in str(error) and SCHEMAS[sent] in str(error) and SCHEMAS[kind] in str(error)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_a_payload_without_schema_is_refused_for_schema(kind: MessageKind) -> None:
    # Prepare
    doc = valid_doc(kind)
    del doc["schema"]

    # Execute
    error = refusal(topic_of(kind), payload_of(doc))

    # Assert
    assert error.reason is Rejection.schema
    assert "schema None" in str(error)


@pytest.mark.parametrize(
    "schema",
    [
        "diredi.status/2",
        "diredi.status/0",
        "DIREDI.STATUS/1",
        "diredi.status/1 ",
        "diredi.status",
        "",
        None,
        1,
        ["diredi.status/1"],
        {"schema": "diredi.status/1"},
        True,
    ],
)
def test_a_schema_other_than_the_topics_is_refused_for_schema(schema: Any) -> None:
    # Prepare
    doc = valid_doc(MessageKind.STATUS)
    doc["schema"] = schema

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload_of(doc))

    # Assert
    assert error.reason is Rejection.schema
    assert "schema" in str(error)


def test_a_wrong_schema_is_refused_before_a_wrong_device_id() -> None:
    # Prepare
    doc = valid_doc(MessageKind.STATUS)
    doc.update(schema="diredi.presence/1", device_id="dev-2")

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload_of(doc))

    # Assert
    assert error.reason is Rejection.schema


def test_a_long_schema_is_not_quoted_whole() -> None:
    # Prepare
    doc = valid_doc(MessageKind.STATUS)
    doc["schema"] = MARK

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload_of(doc))

    # Assert
    assert error.reason is Rejection.schema
    assert_bounded(error)


# Rejection.device_mismatch


@pytest.mark.parametrize("kind", list(MessageKind))
@pytest.mark.parametrize(
    "device_id",
    ["dev-2", "DEV-1", "dev-1 ", " dev-1", "dev-1\n", "dev_1", "", None, 1, ["dev-1"], {"id": "dev-1"}],
)
def test_a_device_id_other_than_the_topics_is_refused_for_device_mismatch(
    kind: MessageKind, device_id: Any
) -> None:
    # Prepare
    doc = valid_doc(kind)
    doc["device_id"] = device_id

    # Execute
    error = refusal(topic_of(kind), payload_of(doc))

    # Assert
    assert error.reason is Rejection.device_mismatch
    assert "device_id" in str(error) and DEVICE in str(error)
    assert_bounded(error)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_a_payload_without_device_id_is_refused_for_device_mismatch(kind: MessageKind) -> None:
    # Prepare
    doc = valid_doc(kind)
    del doc["device_id"]

    # Execute
    error = refusal(topic_of(kind), payload_of(doc))

    # Assert
    assert error.reason is Rejection.device_mismatch
    assert "device_id None" in str(error)


def test_a_valid_message_of_another_device_is_refused_on_this_devices_topic() -> None:
    # Prepare: dev-2's own, valid status
    doc = valid_doc(MessageKind.STATUS)
    doc["device_id"] = "dev-2"
    assert decode(device_topic("dev-2", MessageKind.STATUS), payload_of(doc))[1].device_id == "dev-2"

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload_of(doc))

    # Assert
    assert error.reason is Rejection.device_mismatch


def test_a_long_device_id_is_not_quoted_whole() -> None:
    # Prepare
    doc = valid_doc(MessageKind.PRESENCE)
    doc["device_id"] = MARK

    # Execute
    error = refusal(topic_of(MessageKind.PRESENCE), payload_of(doc))

    # Assert
    assert error.reason is Rejection.device_mismatch
    assert_bounded(error)


# Rejection.invalid

P, S, A = MessageKind.PRESENCE, MessageKind.STATUS, MessageKind.MODEL_ACK
INVALID: dict[tuple[MessageKind, str], list[Any]] = {
    (P, "state"): ["away", "ONLINE", None, 1],
    (P, "conn"): ["", "c 1", "c/1", "c+1", "c#1", "c-1\n", "c\u00e9", "c" * 65, 12, None],
    (S, "uptime_s"): ["soon", None, [], {}, -1, -0.001],
    (S, "inference_count"): [-1, 1.5, 1 << 63, "many"],
    (S, "labelled_count"): [-1],
    (S, "mem_bytes"): [-1],
    (S, "latency_p50_ms"): [-0.5],
    (S, "latency_p95_ms"): [-1],
    (S, "mean_confidence"): [1.0001, -0.1],
    (S, "accuracy"): [1.5, 2],
    (S, "cpu_percent"): [-1, 25_601],
    (S, "temp_c"): [200.5, -101],
    (S, "model_id"): ["", "-base.v1", "base v1", "b" * 129, 7],
    (S, "class_histogram"): [[], "0:1", None, {"0": -1}, {"0": 1.5}, {"0": "one"}, {"0": None}]
    + [{key: 1} for key in ["a", "-1", "01", "00", "1000", "1.5", "1e2", " 1", "1\n", "", "\u0663"]],
    (S, "msg_id"): ["not-a-uuid", 12],
    (S, "sent_at"): ["yesterday", []],
    (S, "surprise"): [1],
    (S, "schema_"): ["diredi.status/1"],
    (A, "result"): ["ok", None],
    (A, "model_id"): ["../kitchen", None],
    (A, "reason"): ["r" * 1025, 5],
    (A, "running_model_id"): [""],
    (A, "surprise"): ["x"],
    (MessageKind.RECEIPT, "ack_of"): ["not-a-uuid", 5, None],
    (MessageKind.RECEIPT, "surprise"): [[]],
    (MessageKind.CMD, "command"): ["reboot", "RUN_RD", None, ["run_rd"]],
    (MessageKind.CMD, "surprise"): [True],
    # decode validates these two as their own modules do
    (MessageKind.KNOWLEDGE, "num_classes"): [1],
    (MessageKind.KNOWLEDGE, "sample_count"): [-1],
    (MessageKind.KNOWLEDGE, "metrics"): [
        {"holdout_size": 12, "holdout_acc_before": 0.5, "holdout_acc_after": 2}
    ],
    (MessageKind.KNOWLEDGE, "preference_map"): [{"dtype": "int32", "shape": [10, 10], "data": "AAAA"}],
    (MessageKind.KNOWLEDGE, "samples"): [[[0.0] * 4]],
    (MessageKind.MODEL_DESIRED, "key_id"): ["not-a-key-id"],
    # the second path is well formed but not the manifest's artifact
    (MessageKind.MODEL_DESIRED, "download_path"): ["/api/v1/artifacts/../x", "/api/v1/artifacts/" + "0" * 64],
    (MessageKind.MODEL_DESIRED, "issued_at"): ["yesterday"],
    (MessageKind.MODEL_DESIRED, "manifest"): [{}],
    (MessageKind.MODEL_DESIRED, "surprise"): [1],
}


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [(kind, field, value) for (kind, field), values in INVALID.items() for value in values],
)
def test_a_bad_field_is_refused_for_invalid_naming_the_field(
    kind: MessageKind, field: str, value: Any
) -> None:
    # Prepare
    doc = valid_doc(kind)
    doc[field] = value

    # Execute
    error = refusal(topic_of(kind), payload_of(doc))

    # Assert
    assert error.reason is Rejection.invalid
    assert str(error).startswith(f"invalid {kind} payload at ")
    assert field in str(error)
    assert_bounded(error)


# msg_id and sent_at have defaults for senders, but every received message must carry them (DESIGN
# §2): a redelivery given a fresh msg_id would be stored twice.
ENVELOPE = ["msg_id", "sent_at"]
REQUIRED = {
    MessageKind.PRESENCE: ["state", "conn", *ENVELOPE],
    MessageKind.STATUS: ["uptime_s", *ENVELOPE],
    MessageKind.KNOWLEDGE: ["base_model_id", "num_classes", "preference_map", "metrics", *ENVELOPE],
    MessageKind.MODEL_ACK: ["model_id", "result", *ENVELOPE],
    MessageKind.MODEL_DESIRED: ["manifest", "download_path", "key_id"],
    MessageKind.RECEIPT: ["ack_of", *ENVELOPE],
    MessageKind.CMD: ["command", *ENVELOPE],
}


@pytest.mark.parametrize(("kind", "field"), [(k, f) for k, fields in REQUIRED.items() for f in fields])
def test_a_missing_required_field_is_refused_for_invalid_naming_it(kind: MessageKind, field: str) -> None:
    # Prepare
    doc = valid_doc(kind)
    del doc[field]

    # Execute
    error = refusal(topic_of(kind), payload_of(doc))

    # Assert
    assert error.reason is Rejection.invalid
    assert f"at {field}: Field required" in str(error)


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (MessageKind.STATUS, "model_id"),
        (MessageKind.STATUS, "class_histogram"),
        (MessageKind.STATUS, "latency_p50_ms"),
        (MessageKind.MODEL_ACK, "reason"),
        (MessageKind.MODEL_ACK, "running_model_id"),
    ],
)
def test_an_optional_field_may_be_left_out(kind: MessageKind, field: str) -> None:
    # Prepare
    doc = valid_doc(kind)
    del doc[field]

    # Execute
    decoded_kind, message = decode(topic_of(kind), payload_of(doc))

    # Assert
    assert decoded_kind is kind
    assert message.device_id == DEVICE


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (MessageKind.PRESENCE, "conn", "c" * 64),
        (MessageKind.PRESENCE, "conn", "A.z_0-9"),
        (MessageKind.PRESENCE, "state", "offline"),
        (MessageKind.STATUS, "mean_confidence", 1),
        (MessageKind.STATUS, "mean_confidence", 0),
        (MessageKind.STATUS, "accuracy", 1.0),
        (MessageKind.STATUS, "uptime_s", 0),
        (MessageKind.STATUS, "inference_count", (1 << 63) - 1),
        (MessageKind.STATUS, "cpu_percent", 25_600),
        (MessageKind.STATUS, "temp_c", -100),
        (MessageKind.STATUS, "class_histogram", {"0": 0, "999": 5}),
        (MessageKind.STATUS, "model_id", None),
        (MessageKind.MODEL_ACK, "reason", "r" * 1024),
        (MessageKind.MODEL_ACK, "result", "rolled_back"),
        (MessageKind.CMD, "command", "report_now"),
    ],
)
def test_values_at_the_edge_of_their_range_are_accepted(kind: MessageKind, field: str, value: Any) -> None:
    # Prepare
    doc = valid_doc(kind)
    doc[field] = value

    # Execute
    _, message = decode(topic_of(kind), payload_of(doc))

    # Assert
    assert json.loads(encode(message))[field] == value


def histogram_status(entries: int) -> bytes:
    """The smallest status payload with a histogram of classes 0 .. entries-1 (defaults left out)."""
    histogram = {str(i): 0 for i in range(entries)}
    return payload_of(
        {
            "schema": SCHEMAS[MessageKind.STATUS],
            "msg_id": str(uuid.uuid4()),
            "device_id": DEVICE,
            "sent_at": "2026-11-28T08:00:00Z",
            "uptime_s": 0,
            "class_histogram": histogram,
        }
    )


def test_a_histogram_of_the_most_classes_a_status_carries_is_accepted() -> None:
    # Prepare
    payload = histogram_status(MAX_HISTOGRAM_CLASSES)
    assert len(payload) <= LIMITS[MessageKind.STATUS]

    # Execute
    _, message = decode(topic_of(MessageKind.STATUS), payload)

    # Assert
    assert isinstance(message, Status)
    assert len(message.class_histogram) == MAX_HISTOGRAM_CLASSES


def test_a_histogram_of_more_entries_than_a_status_carries_is_invalid() -> None:
    # Prepare
    payload = histogram_status(MAX_HISTOGRAM_CLASSES + 1)
    assert len(payload) <= LIMITS[MessageKind.STATUS]

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload)

    # Assert
    assert error.reason is Rejection.invalid
    assert "class_histogram" in str(error)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda doc: doc.update({MARK: 1}),
        lambda doc: doc.update(class_histogram={MARK: 1}),
        lambda doc: doc.update(model_id=MARK),
        lambda doc: doc.update(uptime_s=MARK),
        lambda doc: doc.update(sent_at=MARK),
        lambda doc: doc.update(msg_id=MARK),
        lambda doc: doc.update({"\nERROR forged log line " + MARK[:100]: 1}),
        lambda doc: doc.update(class_histogram={"1\r\nERROR forged": 1}),
        lambda doc: doc.update({"\ud800": 1}),
    ],
    ids=[
        "extra-key",
        "histogram-key",
        "model-id",
        "uptime",
        "sent-at",
        "msg-id",
        "newline-key",
        "crlf-key",
        "surrogate",
    ],
)
def test_an_invalid_field_error_quotes_little_of_the_input(corrupt: Any) -> None:
    # Prepare
    doc = valid_doc(MessageKind.STATUS)
    corrupt(doc)

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), json.dumps(doc).encode())

    # Assert
    assert error.reason is Rejection.invalid
    assert_bounded(error)


def test_an_array_dimension_with_thousands_of_digits_is_not_quoted_whole() -> None:
    # Prepare
    doc = valid_doc(MessageKind.KNOWLEDGE)
    doc["preference_map"]["shape"] = [int("9" * 4000)]

    # Execute
    error = refusal(topic_of(MessageKind.KNOWLEDGE), payload_of(doc))

    # Assert
    assert error.reason is Rejection.invalid
    assert "preference_map" in str(error)
    assert "9" * 121 not in str(error)


@pytest.mark.parametrize("field", ["model_id", "reason"])
def test_an_escaped_lone_surrogate_is_invalid(field: str) -> None:
    # Prepare
    doc = valid_doc(MessageKind.MODEL_ACK)
    payload = payload_of(doc).replace(f'"{field}":"'.encode(), f'"{field}":"\\ud800'.encode())

    # Execute
    error = refusal(topic_of(MessageKind.MODEL_ACK), payload)

    # Assert
    assert error.reason is Rejection.invalid
    assert field in str(error)


# Property: decode returns the topic's message or a ContractError, and nothing else

device_ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)
contract_topics = st.builds(device_topic, device_ids, st.sampled_from(list(MessageKind)))
any_topics = (
    contract_topics | st.text(max_size=80) | st.sampled_from(["diredi/v1/dev/+/status", "diredi/v1/#"])
)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=15,
)
field_names = st.sampled_from(sorted({f for kind in MessageKind for f in valid_doc(kind)})) | st.text(
    max_size=12
)
PROPERTY = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_topic_message_or_contract_error(topic: str, payload: bytes) -> None:
    """The property of decode: the topic's kind and device, or a ContractError with a reason."""
    try:
        kind, message = decode(topic, payload)
    except ContractError as error:
        assert error.reason in set(Rejection) - {Rejection.refused}
        assert_bounded(error)
        return
    assert (message.device_id, kind) == parse_device_topic(topic)
    assert type(message) is TYPES[kind]
    assert decode(topic, encode(message)) == (kind, message)


def dumps(doc: Any, ascii_only: bool) -> bytes:
    """JSON as a sender might write it, NaN and Infinity included when the value holds them."""
    return json.dumps(doc, ensure_ascii=ascii_only).encode()


@PROPERTY
@given(topic=any_topics, payload=st.binary(max_size=600))
def test_any_bytes_on_any_topic_give_the_topics_message_or_a_contract_error(
    topic: str, payload: bytes
) -> None:
    assert_topic_message_or_contract_error(topic, payload)


@PROPERTY
@given(
    topic=contract_topics,
    doc=json_values | st.dictionaries(field_names, json_values, max_size=8),
    envelope=st.booleans(),
    ascii_only=st.booleans(),
)
def test_any_json_document_gives_the_topics_message_or_a_contract_error(
    topic: str, doc: Any, envelope: bool, ascii_only: bool
) -> None:
    # Prepare: often with the topic's schema and device_id, so validation gets past the envelope
    if envelope and isinstance(doc, dict):
        device_id, kind = parse_device_topic(topic)
        doc.update(schema=SCHEMAS[kind], device_id=device_id)

    # Execute / Assert
    assert_topic_message_or_contract_error(topic, dumps(doc, ascii_only))


@PROPERTY
@given(topic=contract_topics, field=field_names, value=json_values, ascii_only=st.booleans())
def test_a_valid_message_with_any_field_replaced_gives_its_message_or_a_contract_error(
    topic: str, field: str, value: Any, ascii_only: bool
) -> None:
    # Prepare
    device_id, kind = parse_device_topic(topic)
    doc = valid_doc(kind)
    doc["device_id"] = device_id
    doc[field] = value

    # Execute / Assert
    assert_topic_message_or_contract_error(topic, dumps(doc, ascii_only))


def test_a_time_without_a_zone_is_invalid() -> None:
    # Prepare
    document = {"schema": SCHEMAS[MessageKind.STATUS], "device_id": DEVICE, "uptime_s": 1}
    payload = payload_of({**document, "sent_at": "2026-11-28T08:00:00"})

    # Execute
    error = refusal(topic_of(MessageKind.STATUS), payload)

    # Assert
    assert error.reason is Rejection.invalid
    assert "sent_at" in str(error)


@pytest.mark.parametrize("depth", [MAX_NESTING, 200, 500])
def test_nesting_beyond_the_limit_is_not_json_whatever_the_callers_stack(depth: int) -> None:
    # Prepare: the same verdict at any stack depth (an ingest thread, a deep test stack)
    payload = STATUS_TEXT[:-1].encode() + b',"uptime_s":' + b"[" * depth + b"]" * depth + b"}"

    def deep(levels: int) -> ContractError:
        return refusal(topic_of(MessageKind.STATUS), payload) if levels == 0 else deep(levels - 1)

    # Execute
    shallow, under_a_deep_stack = deep(0), deep(800)

    # Assert
    assert shallow.reason is under_a_deep_stack.reason is Rejection.not_json
