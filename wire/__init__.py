"""The wire contract between devices and the cloud: topics, payload models and their limits.

Both sides import this package and nothing else of each other; it depends only on pydantic, numpy,
rfc8785 and cryptography (to check a DesiredModel's signature).
"""

from wire.arrays import EncodedArray
from wire.desired import DesiredModel
from wire.errors import ContractError, Rejection
from wire.knowledge import KnowledgeMetrics, KnowledgeReport, PrivacyStatement
from wire.limits import MAX_PAYLOAD_BYTES
from wire.manifest import ArtifactManifest, ProbeOutput, TensorSpec
from wire.messages import (
    AckResult,
    Command,
    CommandName,
    CommandOutcome,
    CommandResult,
    Message,
    ModelAck,
    Presence,
    PresenceState,
    Receipt,
    Status,
    decode,
    encode,
)
from wire.topics import (
    CLOUD_TOPICS,
    DEVICE_ID_PATTERN,
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    MessageKind,
    device_filter,
    device_topic,
    parse_device_topic,
)

__all__ = [
    "CLOUD_TOPICS",
    "DEVICE_ID_PATTERN",
    "DEVICE_PUBLISHES",
    "DEVICE_SUBSCRIBES",
    "MAX_PAYLOAD_BYTES",
    "AckResult",
    "ArtifactManifest",
    "Command",
    "CommandName",
    "CommandOutcome",
    "CommandResult",
    "ContractError",
    "DesiredModel",
    "EncodedArray",
    "KnowledgeMetrics",
    "KnowledgeReport",
    "Message",
    "MessageKind",
    "ModelAck",
    "Presence",
    "PresenceState",
    "PrivacyStatement",
    "ProbeOutput",
    "Receipt",
    "Rejection",
    "Status",
    "TensorSpec",
    "decode",
    "device_filter",
    "device_topic",
    "encode",
    "parse_device_topic",
]
