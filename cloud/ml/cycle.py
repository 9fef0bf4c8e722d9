"""The DiReDi cycle as storable stages: KD a line's first edge model; knowledge → gated next version."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cloud.exceptions import ExportError
from cloud.ml.data import Split
from cloud.ml.distill import (
    KDConfig,
    TrainConfig,
    distill,
    finetune_to_targets,
    predict_proba,
    seed_everything,
    train_classifier,
)
from cloud.ml.export import EdgeArtifact, check_int8_accuracy, export_int8
from cloud.ml.gate import GateVerdict, gate
from cloud.ml.nets import NetSpec, Student, Teacher
from cloud.ml.rd_update import RDConfig, combine_reports, parse_reports, soft_targets, touched_classes
from wire import ArtifactManifest
from wire.manifest import edge_model_id

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


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


@dataclass
class EdgeLine:
    """One version of a model line: the cloud teacher, the float student and its int8 artifact."""

    line: str
    version: int
    teacher: Teacher
    student: Student
    artifact: EdgeArtifact

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
        teacher, student = Teacher(spec), Student(spec)
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
    progress: StageProgress = silent,
) -> EdgeLine:
    """Train a teacher and KD a student from scratch, then export the int8 edge model (version 1).

    With `val`, raises ExportError if the int8 model is more than 1.0 point less accurate than
    float on it (reference models measured elsewhere pass None).
    """
    seed_everything(plan.seed)  # initial weights are drawn from torch's global generator
    teacher = Teacher(spec)
    train_classifier(
        teacher,
        train,
        plan.teacher,
        seed=plan.seed,
        extra=extra,
        progress=lambda d, t: progress("teacher", d, t),
    )
    seed_everything(plan.seed + 1)
    student = Student(spec)
    distill(
        student,
        teacher,
        train,
        plan.student,
        plan.kd,
        seed=plan.seed + 1,
        extra=extra,
        progress=lambda d, t: progress("distill", d, t),
    )
    artifact = export_int8(student, train.x, model_id=edge_model_id(line, 1), line=line, version=1)
    if val is not None:
        check_int8_accuracy(artifact, student.eval(), val)
    return EdgeLine(line, 1, teacher.eval(), student, artifact)


@dataclass(frozen=True)
class CycleResult:
    """What one RD cycle made: a gated candidate, or the reason there is none."""

    outcome: Literal["approved", "rejected", "no-op"]
    reason: str
    candidate: EdgeLine | None  # set for approved and rejected (a rejected model is kept, never offered)
    verdict: GateVerdict | None
    moved_transfer_samples: int
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def approved(self) -> EdgeLine | None:
        """The candidate if the gate approved it."""
        return self.candidate if self.outcome == "approved" else None


def rd_cycle(
    parent: EdgeLine,
    payloads: list[bytes],
    transfer: Split,
    val: Split,
    plan: TrainingPlan,
    config: RDConfig,
    *,
    line: str | None = None,
    progress: StageProgress = silent,
) -> CycleResult:
    """Serialized knowledge reports → RD update → re-KD → int8 export → gate (DESIGN §3 steps 5–7)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now

    reports = parse_reports(payloads)
    knowledge = combine_reports(reports, parent.artifact.manifest, config)
    runtime = parent.artifact.load()
    head = runtime.head()
    p_t = predict_proba(parent.teacher, transfer.x)
    p_star, change = soft_targets(knowledge, p_t, runtime.run(transfer.x)[0], head, config)
    lap("rd_targets")
    moved = int((change > 0).sum())
    touched = touched_classes(p_t, p_star)
    if not touched:
        return CycleResult(
            "no-op", "the knowledge changes no decision on the transfer set", None, None, moved, timings
        )

    weights = (1.0 + config.beta * change).astype(np.float32)
    teacher = finetune_to_targets(
        parent.teacher,
        transfer.x,
        p_star,
        weights,
        plan.teacher_finetune,
        seed=plan.seed + 2,
        progress=lambda d, t: progress("teacher", d, t),
    )
    lap("teacher_update")
    student = Student(parent.student.spec)
    student.load_state_dict(parent.student.state_dict())
    targets = Split(x=transfer.x, y=p_star.argmax(axis=1).astype(np.int64))
    distill(
        student,
        teacher,
        targets,
        plan.rekd,
        plan.kd,
        seed=plan.seed + 3,
        weights=weights,
        progress=lambda d, t: progress("re-KD", d, t),
    )
    lap("rekd")
    line = line or parent.line
    version = parent.version + 1
    p_t_val = predict_proba(parent.teacher, val.x)
    p_star_val, _ = soft_targets(knowledge, p_t_val, runtime.run(val.x)[0], head, config)
    progress("export", 0, 1)
    artifact = export_int8(
        student.eval(), transfer.x, model_id=edge_model_id(line, version), line=line, version=version
    )
    candidate = EdgeLine(line, version, teacher.eval(), student, artifact)
    try:  # the candidate's own labels are the knowledge's targets
        check_int8_accuracy(artifact, student, Split(x=val.x, y=p_star_val.argmax(axis=1)))
    except ExportError as exc:
        return CycleResult("rejected", str(exc), candidate, None, moved, timings)
    progress("export", 1, 1)
    lap("export")

    verdict = gate(
        val_labels=val.y,
        parent_pred=runtime.predict(val.x),
        candidate_pred=artifact.load().predict(val.x),
        target_top1=p_star_val.argmax(axis=1),
        teacher_top1=p_t_val.argmax(axis=1),
        touched=touched,
        config=config,
    )
    lap("gate")
    outcome: Literal["approved", "rejected"] = "approved" if verdict.approved else "rejected"
    return CycleResult(outcome, verdict.reason, candidate, verdict, moved, timings)
