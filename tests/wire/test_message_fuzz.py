"""wire.decode against any input (hypothesis): the topic's message or a ContractError, never another
exception; times without a zone and nesting beyond the limit."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire.message_cases import (
    DEVICE,
    SCHEMAS,
    STATUS_TEXT,
    TYPES,
    any_topics,
    assert_bounded,
    contract_topics,
    field_names,
    json_values,
    payload_of,
    refusal,
    topic_of,
    valid_doc,
)
from wire import (
    ContractError,
    MessageKind,
    Rejection,
    decode,
    encode,
    parse_device_topic,
)
from wire.messages import MAX_NESTING

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
