"""Fields every JSON message carries (DESIGN §2): schema, msg_id, device_id, sent_at."""

import uuid
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from wire.topics import DEVICE_ID_PATTERN

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
ModelId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def _in_utc(value: datetime) -> datetime:
    # A time with a zone that UTC cannot represent (0001-01-01T00:00+01:00) would fail only when stored.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside the range of UTC timestamps") from None


class Envelope(BaseModel):
    """The fields of DESIGN §2 common to every device message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    msg_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    device_id: DeviceId
    sent_at: Annotated[AwareDatetime, AfterValidator(_in_utc)] = Field(default_factory=utcnow)
