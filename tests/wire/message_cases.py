"""What the tests of wire.encode / decode share: the contract's limits and schemas spelled out, a valid
message of each kind, and how a refusal is checked."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from functools import cache
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from tests.wire.test_desired import sign
from tests.wire.test_knowledge import make_report
from wire import (
    DEVICE_ID_PATTERN,
    AckResult,
    Command,
    CommandName,
    CommandOutcome,
    CommandResult,
    ContractError,
    DesiredModel,
    KnowledgeReport,
    Message,
    MessageKind,
    ModelAck,
    Presence,
    PresenceState,
    Receipt,
    Status,
    decode,
    device_topic,
    encode,
)

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
    MessageKind.CMD_RESULT: 16 * KIB,
}
SCHEMAS = {
    MessageKind.PRESENCE: "diredi.presence/1",
    MessageKind.STATUS: "diredi.status/1",
    MessageKind.KNOWLEDGE: "diredi.knowledge/1",
    MessageKind.MODEL_ACK: "diredi.model-ack/1",
    MessageKind.MODEL_DESIRED: "diredi.desired/1",
    MessageKind.RECEIPT: "diredi.receipt/1",
    MessageKind.CMD: "diredi.cmd/1",
    MessageKind.CMD_RESULT: "diredi.cmd_result/1",
}
TYPES: dict[MessageKind, type[Message]] = {
    MessageKind.PRESENCE: Presence,
    MessageKind.STATUS: Status,
    MessageKind.KNOWLEDGE: KnowledgeReport,
    MessageKind.MODEL_ACK: ModelAck,
    MessageKind.MODEL_DESIRED: DesiredModel,
    MessageKind.RECEIPT: Receipt,
    MessageKind.CMD: Command,
    MessageKind.CMD_RESULT: CommandResult,
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
    if kind is MessageKind.CMD_RESULT:
        return CommandResult(
            device_id=DEVICE,
            ack_of=uuid.uuid4(),
            command=CommandName.run_rd,
            outcome=CommandOutcome.done,
            detail="knowledge report spooled",
            values={"knowledge_msg_id": str(uuid.uuid4()), "samples": 120, "accuracy": 0.5, "dp": False},
        )
    return Command(device_id=DEVICE, command=CommandName.run_rd, expires_at=datetime(2030, 1, 1, tzinfo=UTC))


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


STATUS_TEXT = _valid_payload(MessageKind.STATUS).decode()


# Strategies of the property tests: decode returns the topic's message or a ContractError, nothing else

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
