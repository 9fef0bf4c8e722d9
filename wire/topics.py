"""MQTT topic builders and parsers: the only place a topic string is spelled."""

import enum
import functools
import re

from wire.errors import ContractError

DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,62}$"
# The cloud's own MQTT client ids (ingest, publisher, admin) all start with this, and no device id may:
# a device logging in with a service's client id would take that service's session over.
SERVICE_ID_PREFIX = "diredi"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_PREFIX = "diredi/v1/dev/"
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")


class MessageKind(enum.StrEnum):
    """The topic suffixes of DESIGN §2; the value is the suffix after the device id."""

    PRESENCE = "presence"
    STATUS = "status"
    KNOWLEDGE = "knowledge"
    MODEL_ACK = "model/ack"
    MODEL_DESIRED = "model/desired"
    RECEIPT = "receipt"
    CMD = "cmd"
    CMD_RESULT = "cmd/result"


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it matches the contract's pattern, else raise ContractError."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ContractError(f"device_id {device_id!r} does not match {DEVICE_ID_PATTERN}")
    return device_id


def reserved_device_id(device_id: str) -> str | None:
    """Why `device_id` may not be given to a device (it imitates a service's client id), or None."""
    if device_id.startswith(SERVICE_ID_PREFIX):
        return f"device ids may not start with {SERVICE_ID_PREFIX!r}: it names the cloud's own services"
    return None


def device_topic(device_id: str, kind: MessageKind) -> str:
    """The topic of message `kind` for one device."""
    return f"{_PREFIX}{check_device_id(device_id)}/{kind.value}"


@functools.lru_cache(maxsize=65_536)  # a fleet's topics recur with every message; errors are not cached
def parse_device_topic(topic: str) -> tuple[str, MessageKind]:
    """Split a device topic into (device_id, kind); raise ContractError for any other topic."""
    if not topic.startswith(_PREFIX):
        raise ContractError(f"topic {topic!r} is not under {_PREFIX}")
    device_id, _, suffix = topic[len(_PREFIX) :].partition("/")
    try:
        kind = MessageKind(suffix)
    except ValueError:
        raise ContractError(f"topic {topic!r} has an unknown suffix {suffix!r}") from None
    return check_device_id(device_id), kind


# Who sends what (DESIGN §2): the ACL of a device and the ingest's subscriptions follow from these.
DEVICE_PUBLISHES = (
    MessageKind.PRESENCE,
    MessageKind.STATUS,
    MessageKind.KNOWLEDGE,
    MessageKind.MODEL_ACK,
    MessageKind.CMD_RESULT,
)
DEVICE_SUBSCRIBES = (MessageKind.MODEL_DESIRED, MessageKind.RECEIPT, MessageKind.CMD)
# The fleet's trust chain (wire/trust.py), retained; every device subscribes to it.
TRUST_TOPIC = "diredi/v1/trust"
CLOUD_TOPICS = "diredi/v1/#"  # the cloud's service account may publish and subscribe under it


def device_pattern(kind: MessageKind, placeholder: str) -> str:
    """The topic of message `kind` with `placeholder` for the device id (a broker ACL's `%u`)."""
    return f"{_PREFIX}{placeholder}/{kind.value}"


def device_filter(kind: MessageKind, *, shared_group: str | None = None) -> str:
    """The filter matching message `kind` of every device, optionally as an MQTT 5 shared subscription."""
    topic_filter = f"{_PREFIX}+/{kind.value}"
    if shared_group is None:
        return topic_filter
    if not _SHARE_GROUP.fullmatch(shared_group):
        raise ContractError(
            f"shared subscription group {shared_group[:64]!r} must match {_SHARE_GROUP.pattern}"
        )
    return f"$share/{shared_group}/{topic_filter}"
