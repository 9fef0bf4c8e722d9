"""wire.encode / decode: every message kind round-trips on its topic; a payload off its topic, too large,
not JSON or nested too deep is refused with one reason."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from tests.wire.message_cases import (
    DEVICE,
    KEY,
    LIMITS,
    MARK,
    SCHEMAS,
    STATUS_TEXT,
    TYPES,
    _valid_payload,
    assert_bounded,
    make_message,
    payload_of,
    refusal,
    topic_of,
    valid_doc,
)
from tests.wire.test_desired import key_id_of, public_raw, sign
from tests.wire.test_knowledge import make_counts, make_report
from wire import DesiredModel, KnowledgeReport, MessageKind, Rejection, decode, encode
from wire.desired import verify_raw
from wire.messages import MAX_NESTING


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
