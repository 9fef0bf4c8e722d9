"""wire.decode: a payload of another schema or another device, an invalid or missing field, a value at
the edge of its range; errors quote little of what was sent."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.wire.message_cases import (
    DEVICE,
    LIMITS,
    MARK,
    SCHEMAS,
    _valid_payload,
    assert_bounded,
    payload_of,
    refusal,
    topic_of,
    valid_doc,
)
from wire import MessageKind, Rejection, Status, decode, device_topic, encode
from wire.messages import MAX_HISTOGRAM_CLASSES


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
