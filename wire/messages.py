"""The MQTT messages of DESIGN §2 besides the knowledge report and the desired model, and `decode`,
the one way either side turns a received (topic, payload) into a typed message or a `ContractError`."""

import enum
import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, Field, ValidationError

from wire.common import Envelope, ModelId, _in_utc
from wire.desired import DesiredModel
from wire.errors import ContractError, Rejection, describe, shown
from wire.knowledge import KnowledgeReport
from wire.limits import max_payload_bytes
from wire.topics import MessageKind, parse_device_topic

# A status carries the counts of at most this many classes (the most frequent ones on a larger
# model): 1,000 entries would not fit in a status's 8 KiB.
MAX_HISTOGRAM_CLASSES = 256
Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=(1 << 63) - 1)]
ConnId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
ClassKey = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,2})$")]


class PresenceState(enum.StrEnum):
    online = "online"
    offline = "offline"


class Presence(Envelope):
    """A device's connection state, retained. `conn` names one connection: the will registered at
    connect time is `offline` with the same `conn`, so a stale will cannot undo a newer `online`."""

    schema_: Literal["diredi.presence/1"] = Field("diredi.presence/1", alias="schema")
    state: PresenceState
    conn: ConnId


class Status(Envelope):
    """Heartbeat and telemetry of the model the device runs."""

    schema_: Literal["diredi.status/1"] = Field("diredi.status/1", alias="schema")
    model_id: ModelId | None = None
    uptime_s: NonNegative
    inference_count: Count = 0
    latency_p50_ms: NonNegative | None = None
    latency_p95_ms: NonNegative | None = None
    mean_confidence: Fraction | None = None
    class_histogram: dict[ClassKey, Count] = Field(default_factory=dict, max_length=MAX_HISTOGRAM_CLASSES)
    # Samples whose label became known (the user's feedback); stored as a 32-bit integer.
    labelled_count: Annotated[int, Field(ge=0, le=(1 << 31) - 1)] | None = None
    accuracy: Fraction | None = None  # on those samples
    cpu_percent: Annotated[float, Field(ge=0, le=25_600, allow_inf_nan=False)] | None = None
    mem_bytes: Count | None = None
    temp_c: Annotated[float, Field(ge=-100, le=200, allow_inf_nan=False)] | None = None
    # The version of the trust chain (wire/trust.py) the device holds; the cloud signs with a new key
    # once every device reports the version that brought it.
    trust_version: Annotated[int, Field(ge=0, le=(1 << 31) - 1)] | None = None


class AckResult(enum.StrEnum):
    installed = "installed"
    failed = "failed"
    rolled_back = "rolled_back"


class ModelAck(Envelope):
    """The result of acting on a desired model: installed, failed (and why), or rolled back locally."""

    schema_: Literal["diredi.model-ack/1"] = Field("diredi.model-ack/1", alias="schema")
    model_id: ModelId  # the model the desired document named
    result: AckResult
    reason: str = Field("", max_length=1024, pattern=r"^[^\x00]*$")  # no NUL: PostgreSQL text cannot hold it
    running_model_id: ModelId | None = None  # what the device serves now


class Receipt(Envelope):
    """Sent by the cloud after it committed the knowledge report or ack `ack_of`; the device may then
    drop it from its spool."""

    schema_: Literal["diredi.receipt/1"] = Field("diredi.receipt/1", alias="schema")
    ack_of: uuid.UUID


class CommandName(enum.StrEnum):
    run_rd = "run_rd"
    report_now = "report_now"


UTCTime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


class Command(Envelope):
    """An operator's request to one device; a device refuses it once `expires_at` has passed."""

    schema_: Literal["diredi.cmd/1"] = Field("diredi.cmd/1", alias="schema")
    command: CommandName
    expires_at: UTCTime | None = None  # optional: older clouds send none


class CommandOutcome(enum.StrEnum):
    done = "done"
    failed = "failed"
    refused = "refused"  # the device would not run it now (no model, no feedback, no budget)
    expired = "expired"  # it arrived after its `expires_at`


MAX_RESULT_VALUES = 16
ResultKey = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
ResultValue = (
    Annotated[str, Field(max_length=256, pattern=r"^[^\x00]*$")]
    | Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]
    | Finite
    | bool
    | None
)


class CommandResult(Envelope):
    """A device's answer to the command `ack_of`: its outcome, why, and a few values (for `run_rd`,
    the knowledge report's msg_id). A device answers each command once; the cloud receipts it."""

    schema_: Literal["diredi.cmd_result/1"] = Field("diredi.cmd_result/1", alias="schema")
    ack_of: uuid.UUID
    command: CommandName
    outcome: CommandOutcome
    detail: str = Field("", max_length=1024, pattern=r"^[^\x00]*$")  # no NUL: PostgreSQL text cannot hold it
    values: dict[ResultKey, ResultValue] = Field(default_factory=dict, max_length=MAX_RESULT_VALUES)


Message = Presence | Status | KnowledgeReport | ModelAck | DesiredModel | Receipt | Command | CommandResult

PAYLOADS: dict[MessageKind, type[BaseModel]] = {
    MessageKind.PRESENCE: Presence,
    MessageKind.STATUS: Status,
    MessageKind.KNOWLEDGE: KnowledgeReport,
    MessageKind.MODEL_ACK: ModelAck,
    MessageKind.MODEL_DESIRED: DesiredModel,
    MessageKind.RECEIPT: Receipt,
    MessageKind.CMD: Command,
    MessageKind.CMD_RESULT: CommandResult,
}
SCHEMAS: dict[MessageKind, str] = {
    kind: str(model.model_fields["schema_"].default) for kind, model in PAYLOADS.items()
}


ENVELOPE_FIELDS = ("msg_id", "sent_at")
# The contract's documents nest four levels at most. A limit far below the interpreter's recursion
# limit makes the verdict on a deeply nested payload the same on every thread and stack depth.
MAX_NESTING = 32
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _nesting(payload: bytes) -> int:
    """How deep the arrays and objects of `payload` nest (strings skipped), without parsing it."""
    depth = deepest = 0
    for token in _TOKENS.finditer(payload):
        first = token.group()[:1]
        if first in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif first in (b"]", b"}"):
            depth -= 1
    return deepest


def encode(message: Message) -> bytes:
    """The wire payload of `message`: compact JSON with the contract's field names."""
    return message.model_dump_json(by_alias=True).encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def decode(topic: str, payload: bytes) -> tuple[MessageKind, Message]:
    """The kind and the validated message of `payload` received on `topic`.

    Raises `ContractError` whose `reason` says which rule it broke: an unknown topic, an oversized
    payload, not a JSON object, a schema other than the topic's, a `device_id` other than the
    topic's, or an invalid field.
    """
    try:
        device_id, kind = parse_device_topic(topic)
    except ContractError as exc:
        raise ContractError(shown(str(exc)), Rejection.topic) from None
    limit = max_payload_bytes(kind)
    if len(payload) > limit:
        raise ContractError(f"{kind} payload of {len(payload)} bytes exceeds {limit}", Rejection.oversized)
    try:  # The common case, a valid message, in one pass of pydantic's parser (a third of the cost).
        message = PAYLOADS[kind].model_validate_json(payload)
    except (ValidationError, ArithmeticError, RecursionError):  # (nesting too deep for a thread's stack)
        pass  # which rule it broke is found below
    else:
        if "schema_" in message.model_fields_set and getattr(message, "device_id", None) == device_id:
            return kind, _carries_its_envelope(kind, message)
    if _nesting(payload) > MAX_NESTING:
        raise ContractError(
            f"{kind} payload is not JSON nested {MAX_NESTING} deep or less", Rejection.not_json
        )
    try:
        # Decoded here, not by json.loads: given bytes, it also takes UTF-16, UTF-32 and a BOM.
        document = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ContractError(f"{kind} payload is not JSON: {str(exc)[:120]}", Rejection.not_json) from None
    if not isinstance(document, dict):
        raise ContractError(f"{kind} payload is not a JSON object", Rejection.not_json)
    schema = document.get("schema")
    if schema != SCHEMAS[kind]:
        raise ContractError(
            f"{kind} payload has schema {shown(repr(schema), 80)}, expected {SCHEMAS[kind]}", Rejection.schema
        )
    if document.get("device_id") != device_id:
        raise ContractError(
            f"{kind} payload has device_id {shown(repr(document.get('device_id')), 80)}, "
            f"not the topic's {device_id}",
            Rejection.device_mismatch,
        )
    try:
        message = PAYLOADS[kind].model_validate(document)
    except ValidationError as exc:
        raise ContractError(f"invalid {kind} payload at {describe(exc)}", Rejection.invalid) from None
    except ArithmeticError as exc:  # a number a validator could not compute with (no field bounds it)
        raise ContractError(f"invalid {kind} payload: {shown(str(exc), 120)}", Rejection.invalid) from None
    except RecursionError:
        raise ContractError(f"{kind} payload is nested too deeply", Rejection.not_json) from None
    return kind, _carries_its_envelope(kind, message)


def _carries_its_envelope(kind: MessageKind, message: BaseModel) -> Message:
    # The models fill msg_id and sent_at in when a sender builds a message; a received one must carry
    # them (a redelivery given a fresh msg_id would be stored twice).
    for name in _ENVELOPE_OF[kind]:
        if name not in message.model_fields_set:
            raise ContractError(f"invalid {kind} payload at {name}: Field required", Rejection.invalid)
    return message  # type: ignore[return-value]


_ENVELOPE_OF = {
    kind: tuple(name for name in ENVELOPE_FIELDS if name in model.model_fields)
    for kind, model in PAYLOADS.items()
}
