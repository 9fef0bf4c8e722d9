"""The wire contract between devices and the cloud: topics, payload models and their limits.

Both sides import this package and nothing else of each other; it depends only on pydantic, numpy,
rfc8785 and cryptography (to check a DesiredModel's signature).
"""

from wire.arrays import EncodedArray
from wire.desired import DesiredModel
from wire.errors import ContractError
from wire.knowledge import KnowledgeMetrics, KnowledgeReport, PrivacyStatement
from wire.limits import MAX_PAYLOAD_BYTES
from wire.manifest import ArtifactManifest, ProbeOutput, TensorSpec
from wire.topics import DEVICE_ID_PATTERN, MessageKind, device_topic, parse_device_topic

__all__ = [
    "DEVICE_ID_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "ArtifactManifest",
    "ContractError",
    "DesiredModel",
    "EncodedArray",
    "KnowledgeMetrics",
    "KnowledgeReport",
    "MessageKind",
    "PrivacyStatement",
    "ProbeOutput",
    "TensorSpec",
    "device_topic",
    "parse_device_topic",
]
