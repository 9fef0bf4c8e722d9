"""Valid wire documents for registry rows, small and seeded: a model's manifest and a device's knowledge
report, for the tests' factories and the benchmarks that fill a registry."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime

import numpy as np

from wire.arrays import EncodedArray
from wire.knowledge import KnowledgeReport
from wire.manifest import ArtifactManifest, ProbeOutput, TensorSpec

NUM_CLASSES, FEATURE_DIM = 4, 3


def make_manifest(
    blob: bytes,
    *,
    line: str,
    version: int,
    num_classes: int = NUM_CLASSES,
    feature_dim: int = FEATURE_DIM,
    input_width: int = 8,
    probes: int = 1,
) -> ArtifactManifest:
    """A valid manifest for `blob` (the registry checks the manifest, not the flatbuffer inside), small
    by default; a benchmark gives it the production model's shape."""
    rng = np.random.default_rng(version)
    c, d = num_classes, feature_dim
    probe = ProbeOutput(
        input=EncodedArray.from_numpy(rng.normal(size=(1, input_width)), "float32"),
        features=EncodedArray.from_numpy(rng.integers(-128, 127, size=(1, d)), "int8"),
        logits=EncodedArray.from_numpy(rng.integers(-128, 127, size=(1, c)), "int8"),
    )
    return ArtifactManifest(
        model_id=f"{line}.v{version}",
        line=line,
        version=version,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        signature="serving_default",
        input=TensorSpec(name="x", shape=[1, input_width], scale=0.05, zero_point=-3),
        features=TensorSpec(name="features", shape=[1, d], scale=0.1, zero_point=0),
        logits=TensorSpec(name="logits", shape=[1, c], scale=0.2, zero_point=1),
        num_classes=c,
        feature_dim=d,
        head_weight=EncodedArray.from_numpy(rng.normal(size=(c, d)), "float32"),
        head_bias=EncodedArray.from_numpy(np.zeros(c), "float32"),
        probes=[probe] * probes,
    )


def knowledge_report(
    device_id: str, base_model_id: str, *, sent_at: datetime, moves: Mapping[int, int]
) -> bytes:
    """A valid knowledge report, as sent over MQTT: ten samples a class, each class's samples labelled
    as the model reads them except those `moves` sends to another class."""
    c, d = NUM_CLASSES, FEATURE_DIM
    counts = np.eye(c, dtype=np.int32) * 10
    for source, target in moves.items():
        counts[source, source], counts[source, target] = 0, 10
    return KnowledgeReport(
        device_id=device_id,
        sent_at=sent_at,
        base_model_id=base_model_id,
        num_classes=c,
        feature_dim=d,
        sample_count=int(counts.sum()),
        preference_map=EncodedArray.from_numpy(counts, "int32"),
        delta_weight=EncodedArray.from_numpy(np.full((c, d), 0.01), "float16"),
        delta_bias=EncodedArray.from_numpy(np.zeros(c), "float16"),
        metrics=None,
    ).to_bytes()
