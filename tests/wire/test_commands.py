"""The command result (`cmd/result`) and the command's `expires_at`: what the contract accepts, and the
garbage it refuses with the reason `invalid` (the kind-wide rules are in test_messages and
test_message_fields, which run over every kind)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.wire.message_cases import (
    DEVICE,
    LIMITS,
    assert_bounded,
    payload_of,
    refusal,
    topic_of,
    valid_doc,
)
from wire import CommandOutcome, CommandResult, MessageKind, Rejection, decode
from wire.messages import MAX_RESULT_VALUES, Command

RESULT = MessageKind.CMD_RESULT


def decoded(kind: MessageKind, doc: dict[str, Any]) -> Any:
    return decode(topic_of(kind), payload_of(doc))[1]


def test_a_result_round_trips_with_its_values() -> None:
    # Prepare
    doc = valid_doc(RESULT)
    report = str(uuid.uuid4())
    doc["values"] = {"knowledge_msg_id": report, "samples": 120, "accuracy": 0.5, "dp": False, "note": None}

    # Execute
    result = decoded(RESULT, doc)

    # Assert
    assert isinstance(result, CommandResult)
    assert result.values == {
        "knowledge_msg_id": report,
        "samples": 120,
        "accuracy": 0.5,
        "dp": False,
        "note": None,
    }
    assert result.outcome is CommandOutcome.done and str(result.ack_of) == doc["ack_of"]


@pytest.mark.parametrize("outcome", [o.value for o in CommandOutcome])
def test_every_outcome_is_accepted_and_nothing_but_detail_and_values_may_be_left_out(outcome: str) -> None:
    # Prepare
    doc = valid_doc(RESULT)
    doc["outcome"] = outcome
    del doc["detail"], doc["values"]

    # Execute
    result = decoded(RESULT, doc)

    # Assert
    assert (result.outcome.value, result.detail, result.values) == (outcome, "", {})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ack_of", "not-a-uuid"),
        ("ack_of", None),
        ("ack_of", 7),
        ("command", "format_disk"),
        ("command", None),
        ("outcome", "maybe"),
        ("outcome", ["done"]),
        ("detail", "x" * 1025),
        ("detail", "a\x00b"),
        ("detail", 5),
        ("values", []),
        ("values", "k=v"),
        ("values", {f"k{i}": i for i in range(MAX_RESULT_VALUES + 1)}),
        ("values", {"Upper": 1}),
        ("values", {"": 1}),
        ("values", {"k" * 33: 1}),
        ("values", {"k": "v" * 257}),
        ("values", {"k": "a\x00b"}),
        ("values", {"k": {"nested": 1}}),
        ("values", {"k": [1, 2]}),
        ("values", {"k": 10**400}),
        ("extra", 1),
    ],
)
def test_a_result_with_a_bad_field_is_invalid(field: str, value: Any) -> None:
    # Prepare
    doc = valid_doc(RESULT)
    doc[field] = value

    # Execute
    error = refusal(topic_of(RESULT), payload_of(doc))

    # Assert
    assert error.reason is Rejection.invalid, error
    assert_bounded(error)


@pytest.mark.parametrize("number", [b"Infinity", b"NaN", b"1e999"])
def test_a_value_that_is_not_a_finite_number_is_refused(number: bytes) -> None:
    # Prepare
    payload = payload_of({**valid_doc(RESULT), "values": {"k": 1}}).replace(b'"k":1', b'"k":' + number)

    # Execute
    error = refusal(topic_of(RESULT), payload)

    # Assert
    assert error.reason in (Rejection.invalid, Rejection.not_json), error


@pytest.mark.parametrize("field", ["msg_id", "sent_at", "ack_of", "command", "outcome", "device_id"])
def test_a_result_without_a_required_field_is_refused(field: str) -> None:
    # Prepare
    doc = valid_doc(RESULT)
    del doc[field]

    # Execute
    error = refusal(topic_of(RESULT), payload_of(doc))

    # Assert
    expected = Rejection.device_mismatch if field == "device_id" else Rejection.invalid
    assert error.reason is expected


def test_the_longest_detail_with_every_value_fits_the_16_kib_limit() -> None:
    # Execute / Assert
    assert LIMITS[RESULT] == 16 * 1024
    doc = valid_doc(RESULT)
    doc["detail"] = "é" * 1024  # the longest detail, escaped: six bytes a character
    doc["values"] = {f"v{i}": "x" * 256 for i in range(MAX_RESULT_VALUES)}
    assert len(payload_of(doc)) <= LIMITS[RESULT]
    assert isinstance(decoded(RESULT, doc), CommandResult)


def test_a_command_carries_its_expiry_in_utc_and_an_older_clouds_command_has_none() -> None:
    # Prepare
    doc = valid_doc(MessageKind.CMD)
    doc["expires_at"] = "2030-01-01T02:00:00+02:00"
    older = valid_doc(MessageKind.CMD)
    del older["expires_at"]

    # Execute
    command, old = decoded(MessageKind.CMD, doc), decoded(MessageKind.CMD, older)

    # Assert
    assert isinstance(command, Command) and command.expires_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert command.expires_at is not None and command.expires_at.tzinfo is UTC
    assert old.expires_at is None


@pytest.mark.parametrize(
    "expires_at", ["2030-01-01T00:00:00", "tomorrow", "2030-13-01T00:00:00Z", "0001-01-01T00:00:00+01:00"]
)
def test_a_command_with_an_expiry_without_a_zone_or_unreadable_is_invalid(expires_at: Any) -> None:
    # Prepare
    doc = valid_doc(MessageKind.CMD)
    doc["expires_at"] = expires_at

    # Execute
    error = refusal(topic_of(MessageKind.CMD), payload_of(doc))

    # Assert
    assert error.reason is Rejection.invalid, error


def test_the_device_of_a_result_must_be_the_topics() -> None:
    # Prepare
    doc = valid_doc(RESULT)
    doc["device_id"] = "cam-other"

    # Execute / Assert
    assert refusal(topic_of(RESULT), payload_of(doc)).reason is Rejection.device_mismatch
    assert DEVICE != "cam-other"
