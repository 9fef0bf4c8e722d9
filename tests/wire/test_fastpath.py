"""The status fast path (wire/fastpath.py) against the contract's `decode`: whatever it takes, `decode`
takes with the same values; `decode_fast` gives `decode`'s verdict on everything."""

import json
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cloud.ingest.hostile import A, hostile
from tests.wire.message_cases import DEVICE, json_values, payload_of, topic_of, valid_doc
from wire.errors import ContractError
from wire.fastpath import StatusRecord, as_status, decode_fast, fast_status
from wire.messages import Status, decode
from wire.topics import MessageKind, device_topic

STATUS = MessageKind.STATUS
TOPIC = topic_of(STATUS)


def verdict(decoder: Any, topic: str, payload: bytes) -> tuple[str, Any]:
    """("ok", the message as the contract's model) or ("refused", the reason)."""
    try:
        kind, message = decoder(topic, payload)
    except ContractError as error:
        return "refused", error.reason
    if isinstance(message, StatusRecord):
        message = as_status(message)
    return "ok", (kind, message.model_dump())


def assert_same_verdict(topic: str, payload: bytes) -> None:
    assert verdict(decode_fast, topic, payload) == verdict(decode, topic, payload)


def with_field(value: Any, field: str, base: dict[str, Any] | None = None) -> bytes:
    return payload_of((base or valid_doc(STATUS)) | {field: value})


def test_a_valid_status_takes_the_fast_path_with_the_contracts_values() -> None:
    payload = payload_of(valid_doc(STATUS))
    record = fast_status(DEVICE, payload)
    assert record is not None
    assert as_status(record) == decode(TOPIC, payload)[1]


def test_the_fast_paths_fields_are_the_contracts() -> None:
    fields = {f.encode_name: f.default for f in msgspec.structs.fields(StatusRecord)}
    contract = {info.alias or name: info for name, info in Status.model_fields.items()}
    assert set(fields) == set(contract)
    for name, default in fields.items():
        if default is not msgspec.NODEFAULT and name != "schema":
            assert contract[name].get_default(call_default_factory=True) == default, name


@pytest.mark.parametrize(
    "sent_at",
    [
        "2026-12-05T14:47:18.859654Z",
        "2026-12-05t14:47:18z",
        "2026-12-05 14:47:18Z",
        "2026-12-05T14:47:18.8596541234Z",
        "2026-12-05T14:47Z",
        "2026-12-05T14:47:18+01:00",
        "2026-12-05T14:47:18+0100",
        "2026-12-05T14:47:18-00:00",
        "2026-12-05T14:47:18,5Z",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "2026-12-05T24:00:00Z",
        "2026-12-05T23:59:60Z",
        "2026-02-29T00:00:00Z",
        "2026-12-05T14:47:18",
        "1764946038",
    ],
)
def test_times(sent_at: str) -> None:
    assert_same_verdict(TOPIC, with_field(sent_at, "sent_at"))


@pytest.mark.parametrize(
    "msg_id",
    [
        str(uuid.UUID(int=7)).upper(),
        uuid.UUID(int=7).hex,
        "{" + str(uuid.UUID(int=7)) + "}",
        "urn:uuid:" + str(uuid.UUID(int=7)),
        str(uuid.UUID(int=7))[:-1] + "g",
        "",
    ],
)
def test_message_ids(msg_id: str) -> None:
    assert_same_verdict(TOPIC, with_field(msg_id, "msg_id"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_id", "base.v1\n"),
        ("model_id", "x" * 128),
        ("model_id", "x" * 129),
        ("model_id", ""),
        ("model_id", "-base"),
        ("model_id", "ba se"),
        ("model_id", "base\u0661"),
        ("device_id", DEVICE + "\n"),
        ("device_id", DEVICE.upper()),
        ("class_histogram", {"01": 1}),
        ("class_histogram", {"-1": 1}),
        ("class_histogram", {"1000": 1}),
        ("class_histogram", {" 1": 1}),
        ("class_histogram", {"\u0661": 1}),
        ("class_histogram", {"999": (1 << 63) - 1}),
        ("class_histogram", {"1": 1 << 63}),
        ("class_histogram", {str(n): 1 for n in range(257)}),
        ("class_histogram", {str(n): 1 for n in range(256)}),
        ("uptime_s", "1.5"),
        ("uptime_s", True),
        ("uptime_s", -0.0),
        ("uptime_s", 10**30),
        ("uptime_s", 1.7976931348623157e308),
        ("inference_count", 1.0),
        ("inference_count", (1 << 63) - 1),
        ("inference_count", 1 << 63),
        ("labelled_count", (1 << 31) - 1),
        ("labelled_count", 1 << 31),
        ("mean_confidence", 1.0000001),
        ("cpu_percent", 25_600),
        ("temp_c", -100.5),
        ("schema", "diredi.status/2"),
        ("schema_", "diredi.status/1"),
    ],
)
def test_bounds_and_forms(field: str, value: Any) -> None:
    assert_same_verdict(TOPIC, with_field(value, field))


@pytest.mark.parametrize("field", sorted(valid_doc(STATUS)))
def test_every_field_missing_or_null(field: str) -> None:
    doc = valid_doc(STATUS)
    doc.pop(field)
    assert_same_verdict(TOPIC, payload_of(doc))
    assert_same_verdict(TOPIC, with_field(None, field))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"uptime_s":1,"uptime_s":2,',
        b'{"uptime_s":1e400,',
        b'{"uptime_s":NaN,',
        b'{"model_id":"\\ud800",',
        b'{"model_id":"bas\\u0065.v1",',
        b'{"device_id":"dev\\u002d1",',
    ],
)
def test_raw_json(raw: bytes) -> None:
    rest = payload_of({k: v for k, v in valid_doc(STATUS).items() if k.encode() not in raw})
    assert_same_verdict(TOPIC, raw + rest[1:])


def test_other_topics_are_decoded_by_the_contract() -> None:
    for kind in (MessageKind.PRESENCE, MessageKind.MODEL_ACK):
        payload = payload_of(valid_doc(kind))
        assert decode_fast(topic_of(kind), payload) == decode(topic_of(kind), payload)
    for topic in ("diredi/v1/dev/x/status", "diredi/v1/dev/dev-1/nope", "other"):
        assert_same_verdict(topic, payload_of(valid_doc(STATUS)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(sorted(valid_doc(STATUS))), value=json_values)
def test_any_value_in_any_field(field: str, value: Any) -> None:
    assert_same_verdict(TOPIC, with_field(value, field))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile())
def test_the_ingest_fuzzs_hostile_payloads(case: Any) -> None:
    assert_same_verdict(device_topic(A, case.kind), case.payload)


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(sorted(valid_doc(STATUS))), json_values, max_size=20))
def test_documents_built_from_the_fields(doc: dict[str, Any]) -> None:
    base = valid_doc(STATUS) | doc
    assert_same_verdict(TOPIC, json.dumps(base).encode())
