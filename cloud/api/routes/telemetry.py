"""Telemetry queries: a device's (or a model's) status samples over a time range."""

from datetime import UTC, datetime
from typing import Annotated, Self

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from cloud.api.deps import ReaderDep, Viewer
from cloud.api.schemas import Page, TelemetryPublic
from cloud.registry import telemetry

router = APIRouter(prefix="/api/v1/telemetry", tags=["telemetry"])


def _iso_8601(value: object) -> object:
    """Only ISO 8601 text: pydantic would otherwise read `0.0` as a Unix time the schema never offers."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not an ISO 8601 date-time (e.g. 2026-01-01T00:00:00Z)") from None
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_8601)]


class TelemetryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str | None = Field(None, max_length=63)
    model_id: str | None = Field(None, max_length=128)
    since: IsoDateTime | None = Field(None, description="inclusive, ISO 8601 with a time zone")
    until: IsoDateTime | None = Field(None, description="exclusive, ISO 8601 with a time zone")
    limit: int = Field(1000, ge=1, le=10_000)
    offset: int = Field(0, ge=0, le=1_000_000_000)

    @model_validator(mode="after")
    def _aware_and_ordered(self) -> Self:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is None:
                continue
            if value.tzinfo is None:
                raise ValueError(f"{name} needs a time zone (e.g. 2026-01-01T00:00:00Z)")
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError(f"{name} is out of range") from None
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be before until")
        return self


@router.get("")
async def query(
    reader: ReaderDep, _: Viewer, params: Annotated[TelemetryQuery, Query()]
) -> Page[TelemetryPublic]:
    """Status samples, newest first, of one device or model (or all) within [since, until), a page
    with the number that match in all."""
    rows, total = await reader.run_sync(
        telemetry.query_page,
        device_id=params.device_id,
        model_id=params.model_id,
        since=params.since,
        until=params.until,
        limit=params.limit,
        offset=params.offset,
    )
    return Page.of(TelemetryPublic, rows, total, limit=params.limit, offset=params.offset)
