"""A line's first edge model: the teacher trained on the presumed data, KD into the student, the
guarded int8 export (the cycle, `cycle.py`, makes the next versions from knowledge)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from cloud.exceptions import ExportAttempt
from cloud.ml.data import Split
from cloud.ml.distill import (
    KDConfig,
    TrainConfig,
    distill,
    seed_everything,
    train_classifier,
)
from cloud.ml.export import (
    MAX_INT8_DROP,
    EdgeArtifact,
    export_guarded,
    export_int8,
)
from cloud.ml.families import NetSpec
from cloud.ml.nets import EdgeStudent
from wire import ArtifactManifest
from wire.manifest import edge_model_id

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)
_RESETTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def silent(stage: str, done: int, total: int) -> None:
    """The default progress sink: reports nothing."""


@dataclass(frozen=True)
class TrainingPlan:
    """Epochs and seeds of every training stage."""

    teacher: TrainConfig = TrainConfig(epochs=40)
    student: TrainConfig = TrainConfig(epochs=120, augment=True)
    teacher_finetune: TrainConfig = TrainConfig(epochs=15, lr=5e-4)
    rekd: TrainConfig = TrainConfig(epochs=150, augment=True)
    kd: KDConfig = KDConfig()
    seed: int = 0
    max_int8_drop: float = MAX_INT8_DROP  # the export guard: int8 within this of float


# The conv pair on mnist-5k (~2,800 training images of 28×28): ~1 s an epoch for the teacher, ~1 s for
# the student with its augmented copies on this machine's two cores. The copies' noise (0.1, a tenth of
# the pixel range) keeps the student as robust to noisy inputs as its teacher: 93.0% rather than 90.3%
# on test images with noise of 25 pixel levels (93.5% and 93.3% on clean ones).
# A manufacturer's smaller data gets at least the steps the smallest presumed split of mnist-5k's
# generated scenarios gets (~1,750 images); a few hundred images would otherwise train for a hundred.
CONV_PLAN = TrainingPlan(
    teacher=TrainConfig(epochs=15, min_steps=400),
    student=TrainConfig(epochs=30, lr=3e-3, augment=True, augment_noise=0.1, min_steps=800),
    teacher_finetune=TrainConfig(epochs=5, lr=5e-4, min_steps=100),
    rekd=TrainConfig(epochs=30, lr=3e-3, augment=True, augment_noise=0.1, min_steps=600),
)


def plan_for(spec: NetSpec, seed: int = 0, max_int8_drop: float = MAX_INT8_DROP) -> TrainingPlan:
    """The family's default plan: the MLP pair's was measured on digits, every other family (the conv
    pair, a manufacturer's own) starts from the conv pair's, measured on mnist-5k."""
    base = TrainingPlan() if spec.family == "mlp" else CONV_PLAN
    return dataclasses.replace(base, seed=seed, max_int8_drop=max_int8_drop)


@dataclass
class EdgeLine:
    """One version of a model line: the cloud teacher, the float student and its int8 artifact."""

    line: str
    version: int
    teacher: torch.nn.Module
    student: EdgeStudent
    artifact: EdgeArtifact
    export: list[ExportAttempt] = field(default_factory=list)  # how the artifact was quantized

    @property
    def model_id(self) -> str:
        """The artifact's model id."""
        return self.artifact.manifest.model_id

    def save(self, directory: Path) -> None:
        """Store the version under `directory` (state dicts, artifact and manifest)."""
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.teacher.state_dict(), directory / "teacher.pt")
        torch.save(self.student.state_dict(), directory / "student.pt")
        (directory / "edge.tflite").write_bytes(self.artifact.model)
        (directory / "manifest.json").write_text(self.artifact.manifest.to_json())

    @classmethod
    def load(cls, directory: Path, spec: NetSpec) -> EdgeLine:
        """Load a version stored by `save`."""
        teacher, student = spec.build()
        teacher.load_state_dict(torch.load(directory / "teacher.pt", weights_only=True))
        student.load_state_dict(torch.load(directory / "student.pt", weights_only=True))
        manifest = ArtifactManifest.from_json((directory / "manifest.json").read_text())
        artifact = EdgeArtifact(model=(directory / "edge.tflite").read_bytes(), manifest=manifest)
        return cls(manifest.line, manifest.version, teacher.eval(), student.eval(), artifact)


def train_line(
    train: Split,
    spec: NetSpec,
    plan: TrainingPlan,
    *,
    line: str,
    val: Split | None,
    extra: Split | None = None,
    pixel_scale: float | None = None,
    progress: StageProgress = silent,
) -> EdgeLine:
    """Train a teacher and KD a student from scratch, then export the int8 edge model (version 1).

    With `val`, the export tries the fallbacks of export_guarded until int8 is within 1.0 point of
    float on it, and raises ExportGaveUp (with every attempt) if none is; reference models measured
    elsewhere pass None. `pixel_scale` goes into the manifest of a model that takes images.
    """
    seed_everything(plan.seed)  # initial weights are drawn from torch's global generator
    teacher, student = spec.build()
    train_classifier(
        teacher,
        train,
        plan.teacher,
        seed=plan.seed,
        extra=extra,
        progress=partial(progress, "teacher"),
    )
    seed_everything(plan.seed + 1)
    for module in student.modules():  # the student's initial weights drawn from this seed alone
        if isinstance(module, _RESETTABLE):
            module.reset_parameters()
    distill(
        student,
        teacher,
        train,
        plan.student,
        plan.kd,
        seed=plan.seed + 1,
        extra=extra,
        progress=partial(progress, "distill"),
    )
    model_id = edge_model_id(line, 1)
    if val is None:
        artifact = export_int8(
            student.eval(), train.x, model_id=model_id, line=line, version=1, pixel_scale=pixel_scale
        )
        return EdgeLine(line, 1, teacher.eval(), student, artifact)
    student, artifact, attempts = export_guarded(
        student.eval(),
        train.x,
        val,
        model_id=model_id,
        line=line,
        version=1,
        max_drop=plan.max_int8_drop,
        pixel_scale=pixel_scale,
        progress=partial(progress, "export"),
    )
    return EdgeLine(line, 1, teacher.eval(), student, artifact, attempts)
