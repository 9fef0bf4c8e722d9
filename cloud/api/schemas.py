"""The API's request and response bodies, apart from the tables (STYLE 8): `XCreate`, `XPublic`, pages."""

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar, cast

import orjson
from fastapi import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cloud.exceptions import InvalidValueError
from cloud.fleet_ca import MAX_CSR_BYTES
from cloud.pipeline.rollout_checks import RolloutPlan
from cloud.registry import labels
from cloud.registry.tables import (
    BrokerSync,
    CommandState,
    DeviceStatus,
    EnrolmentState,
    JobState,
    KnowledgeStatus,
    ModelKind,
    ModelStatus,
    Presence,
    Role,
    RolloutScope,
    RolloutState,
    TargetState,
)
from wire.common import ModelId
from wire.messages import CommandName
from wire.topics import DEVICE_ID_PATTERN, reserved_device_id

T = TypeVar("T")
Slug = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
Label = Annotated[str, StringConstraints(max_length=128)]
Reason = Annotated[str, StringConstraints(max_length=1000)]


def _parses_as_selector(text: str) -> str:
    try:
        labels.parse_selector(text)
    except InvalidValueError as exc:
        raise ValueError(str(exc)) from None
    return text


# A label selector: `key=value`, `key!=value`, `key` (has it), `!key`, comma-separated, all must match.
Selector = Annotated[str, StringConstraints(max_length=1200), AfterValidator(_parses_as_selector)]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class Input(BaseModel):
    """Request bodies refuse unknown fields, so a typo is an error rather than silently ignored, and
    NUL characters, which PostgreSQL cannot store."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if _has_nul(data):
            raise ValueError("text must not contain NUL characters")
        return data


class Output(BaseModel):
    """Response bodies are read from registry rows."""

    model_config = ConfigDict(from_attributes=True)


class Page(Output, Generic[T]):
    """One page of a list, with the total number of matches."""

    items: list[T]
    total: int
    limit: int
    offset: int

    @classmethod
    def of(cls, schema: type[T], rows: Iterable[Any], total: int, *, limit: int, offset: int) -> "Page[T]":
        """The page of registry rows `rows`, each read into `schema`."""
        validate = cast(type[BaseModel], schema).model_validate
        return cls(items=[cast(T, validate(r)) for r in rows], total=total, limit=limit, offset=offset)


def page_response(items: list[dict[str, Any]], total: int, *, limit: int, offset: int) -> Response:
    """A `Page` of registry rows encoded straight to JSON, for the lists a fleet makes long (devices).

    The rows come from the registry's own columns, so validating them again buys nothing; reading a
    page of 100 devices into models and serialising them was a third of the request's CPU. The route
    still declares `Page[...]` as its response model (OpenAPI), and a test holds the document equal to
    what that model would produce.
    """
    page = {"items": items, "total": total, "limit": limit, "offset": offset}
    return Response(orjson.dumps(page, option=orjson.OPT_UTC_Z), media_type="application/json")


class Problem(BaseModel):
    """An RFC 9457 problem."""

    type: str
    title: str
    status: int
    detail: str


class FieldError(BaseModel):
    location: str = Field(examples=["body.cohort_id"])
    message: str


class ValidationProblem(Problem):
    """A 422 problem: every field that was wrong, and why."""

    errors: list[FieldError]


class CohortCreate(Input):
    id: Slug = Field(examples=["kitchen-cams"])
    description: Annotated[str, StringConstraints(max_length=1000)] = ""


class CohortPublic(Output):
    id: str
    description: str
    created_at: datetime


def _not_reserved(device_id: str) -> str:
    reason = reserved_device_id(device_id)
    if reason is not None:
        raise ValueError(reason)
    return device_id


class DeviceCreate(Input):
    id: Annotated[Slug, AfterValidator(_not_reserved)] = Field(examples=["cam-0042"])
    cohort_id: Slug = Field(examples=["kitchen-cams"])
    labels: dict[Label, Label] = Field(default_factory=dict, max_length=32, examples=[{"site": "lab-2"}])
    csr: Annotated[str, StringConstraints(max_length=MAX_CSR_BYTES)] | None = Field(
        None,
        description="the device's certificate signing request (PEM; `diredi-device csr`): the device is "
        "given a certificate for its own key instead of a password",
    )


class DeviceUpdate(Input):
    labels: dict[Label, Label | None] = Field(
        max_length=32,
        description="labels to set (a value) or remove (null); the device's other labels stay",
        examples=[{"site": "lab-3", "tier": None}],
    )


class DevicePublic(Output):
    id: str
    cohort_id: str
    status: DeviceStatus
    labels: dict[str, str]
    desired_model_id: str | None
    reported_model_id: str | None
    presence: Presence
    last_seen: datetime | None
    created_at: datetime
    revoked_at: datetime | None
    trust_version: int | None = Field(description="the version of the signing keys' trust chain it holds")
    broker_sync: BrokerSync | None = Field(
        description="whether the broker reflects this device's state yet (pending: the reconciler is "
        "still applying a provisioning or a revocation); null when no broker is managed"
    )
    broker_error: str | None = Field(description="why the broker could not be updated yet, if it could not")
    cert_sha256: str | None = Field(
        None, description="a certificate device's certificate (SHA-256 of its DER); null: a password device"
    )
    cert_not_after: datetime | None = Field(
        None, description="when a certificate device's certificate expires"
    )


class TrustedKey(Output):
    key_id: str
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    active: bool


class DeviceProvisioned(Output):
    """The device and its credentials: a password shown this once (only its hash is stored), or the
    certificate the fleet CA issued for the device's own key."""

    device: DevicePublic
    secret: str | None = Field(
        description="a password device's password for MQTT and artifact downloads; shown once"
    )
    certificate: str | None = Field(None, description="a certificate device's certificate (PEM)")
    ca_certificate: str | None = Field(
        None, description="the fleet CA's certificate (PEM), which the broker trusts for devices"
    )
    trusted_keys: list[TrustedKey]
    trust_version: int = Field(description="the trust chain's version those keys are (the device's root)")
    trust_threshold: int = Field(description="how many of those keys must sign the chain's next version")


class EnrolmentCreate(Input):
    serial: Annotated[Slug, AfterValidator(_not_reserved)] = Field(
        description="the device's serial number, which becomes its device id", examples=["cam-0042"]
    )
    cohort_id: Slug = Field(examples=["kitchen-cams"])
    labels: dict[Label, Label] = Field(default_factory=dict, max_length=32)


class EnrolmentDecision(Input):
    cohort_id: Slug | None = Field(None, description="the cohort it joins (needed unless pre-registered)")


class EnrolmentRequest(Input):
    serial: Slug = Field(examples=["cam-0042"])
    csr: Annotated[str, StringConstraints(max_length=MAX_CSR_BYTES)] = Field(
        description="the device's certificate signing request, CN = the serial (`diredi-device csr`)"
    )


class EnrolmentPublic(Output):
    serial: str
    state: EnrolmentState
    cohort_id: str | None
    labels: dict[str, str]
    batch: str | None = Field(description="the claim batch the device asked with")
    created_at: datetime
    requested_at: datetime | None
    decided_at: datetime | None
    decided_by: str | None
    enrolled_at: datetime | None


class ModelPublic(Output):
    id: str
    cohort_id: str
    kind: ModelKind
    version: int
    parent_id: str | None
    teacher_id: str | None
    format: str
    sha256: str
    size: int
    metrics: dict[str, Any]
    status: ModelStatus
    status_reason: str
    job_id: uuid.UUID | None
    created_at: datetime
    decided_at: datetime | None


class ModelDetail(ModelPublic):
    manifest: dict[str, Any] | None


class Decision(Input):
    reason: Reason = Field("", examples=["gate passed; canary looks healthy"])


class LineageNode(Output):
    id: str
    type: str
    label: str


class LineageEdge(Output):
    source: str
    target: str
    relation: str


class LineagePublic(Output):
    model_id: str
    nodes: list[LineageNode]
    edges: list[LineageEdge]
    running_devices_total: int
    mermaid: str


class KnowledgePublic(Output):
    """A knowledge report's metadata. The payload is never served: it is the device's, for the pipeline."""

    msg_id: uuid.UUID
    device_id: str
    base_model_id: str
    schema_: str = Field(alias="schema", validation_alias="schema")
    size_bytes: int
    sample_count: int
    dp_epsilon: float | None
    metrics: dict[str, Any]
    status: KnowledgeStatus
    status_reason: str
    job_id: uuid.UUID | None
    sent_at: datetime
    received_at: datetime


class JobPublic(Output):
    id: uuid.UUID
    type: str
    cohort_id: str | None
    state: JobState
    progress: float = Field(description="0 to 1")
    stage: str
    params: dict[str, Any]
    result: dict[str, Any]
    error: str
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RolloutPublic(Output):
    id: uuid.UUID
    cohort_id: str
    model_id: str
    state: RolloutState
    scope: RolloutScope = Field(description="cohort, devices (a list) or selector (labels)")
    selector: str | None = Field(description="the label selector of a selector rollout")
    waves: dict[str, Any]
    current_wave: int
    reason: str
    created_by: str
    created_at: datetime
    updated_at: datetime
    targets: dict[str, int] = Field(description="how many targets are in each state")
    progress: float = Field(description="installed targets / all targets")


class RolloutCreate(Input):
    model_id: ModelId = Field(examples=["kitchen-cams.v3"])
    plan: RolloutPlan | None = Field(None, description="waves and halt thresholds (default: the defaults)")
    device_ids: list[Slug] | None = Field(
        None,
        min_length=1,
        max_length=10_000,
        description="these devices, in this order (the first are the canary); default: the cohort's "
        "active devices, those online first",
    )
    selector: Selector | None = Field(
        None,
        examples=["site=lab-2,tier!=beta"],
        description="the cohort's active devices whose labels match (resolved again before each wave, "
        "so devices that join the group while it runs get the model too); not with device_ids",
    )

    @model_validator(mode="after")
    def _one_scope(self) -> "RolloutCreate":
        if self.device_ids is not None and self.selector is not None:
            raise ValueError("a rollout is for a list of devices or for a label selector, not both")
        return self


class RolloutTargetPublic(Output):
    device_id: str
    wave: int
    state: TargetState
    reason: str
    updated_at: datetime


class TelemetryPublic(Output):
    device_id: str
    at: datetime
    model_id: str | None
    uptime_s: float | None
    inference_count: int | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    mean_confidence: float | None
    labelled_count: int | None
    accuracy: float | None
    cpu_percent: float | None
    mem_bytes: int | None
    temp_c: float | None
    class_histogram: dict[str, Any] | None


class ApiKeyCreate(Input):
    role: Role
    name: Annotated[str, StringConstraints(max_length=128)] = ""


class ApiKeyPublic(Output):
    id: str
    name: str
    role: Role
    active: bool
    created_at: datetime
    last_used_at: datetime | None


class ApiKeyCreated(Output):
    key: ApiKeyPublic
    secret: str = Field(description="the bearer token; shown this once")


class Health(BaseModel):
    status: str


def errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, each a problem+json with its description."""
    return {status: {"model": Problem, "description": text} for status, text in described.items()}


class CommandCreate(Input):
    command: CommandName = Field(
        description="report_now: publish a status now; run_rd: run RD on the device's private feedback "
        "now and send its knowledge report"
    )
    ttl_s: Annotated[int, Field(strict=True, ge=10, le=86_400)] = Field(
        3600, description="seconds the command may wait for its device to be online before it expires"
    )


class CommandPublic(Output):
    id: uuid.UUID = Field(description="the command message's msg_id; the device's result names it")
    device_id: str
    command: CommandName
    state: CommandState = Field(description="pending → sent → done, failed, refused or expired")
    requested_by: str
    created_at: datetime
    sent_at: datetime | None = Field(description="when it was last published to the device")
    send_count: int
    expires_at: datetime
    finished_at: datetime | None
    detail: str = Field(description="the device's reason or note, or why it expired")
    values: dict[str, Any] = Field(description="what the device reported, e.g. knowledge_msg_id for run_rd")
    result_msg_id: uuid.UUID | None
