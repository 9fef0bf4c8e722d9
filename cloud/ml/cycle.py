"""The DiReDi cycle: knowledge → RD update → candidate recipes → the gated next version of a line
(its first version: `line.py`)."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from cloud.exceptions import ExportAttempt, ExportGaveUp
from cloud.ml.data import FloatArray, IntArray, Split
from cloud.ml.distill import (
    KDConfig,
    distill,
    predict_proba,
)
from cloud.ml.export import (
    export_guarded,
    relabelled,
)
from cloud.ml.gate import GateVerdict, gate
from cloud.ml.line import EdgeLine, StageProgress, TrainingPlan, silent
from cloud.ml.nets import EdgeStudent
from cloud.ml.rd_update import (
    Knowledge,
    RDConfig,
    combine_reports,
    parse_reports,
    soft_targets,
    touched_classes,
)
from cloud.ml.recipes import REKD, Recipe, SearchConfig, applies
from cloud.ml.targets import KnowledgeTargets
from wire.manifest import edge_model_id


@dataclass(frozen=True)
class CandidateRecord:
    """What one recipe made and how it fared on the selection split."""

    recipe: str
    status: str  # "chosen", "passed", "refused", "export-failed"
    reason: str
    agreement: float | None
    changed_samples: int
    untouched_drop: float | None
    seconds: float
    export: list[dict[str, object]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CycleResult:
    """What one RD cycle made: a gated candidate, or the reason there is none."""

    outcome: Literal["approved", "rejected", "no-op"]
    reason: str
    candidate: EdgeLine | None  # set for approved and rejected (a rejected model is kept, never offered)
    verdict: GateVerdict | None
    moved_transfer_samples: int
    timings_s: dict[str, float] = field(default_factory=dict)
    candidates: list[CandidateRecord] = field(default_factory=list)

    @property
    def approved(self) -> EdgeLine | None:
        """The candidate if the gate approved it."""
        return self.candidate if self.outcome == "approved" else None


def _selection(n: int, fraction: float, seed: int) -> tuple[IntArray, IntArray]:
    """(fit, selection) indices of the transfer set, disjoint and seeded."""
    order = np.random.default_rng([seed, 17]).permutation(n)
    held = int(round(n * fraction))
    return np.sort(order[held:]), np.sort(order[:held])


@dataclass(frozen=True)
class _Trained:
    line: EdgeLine
    attempts: list[ExportAttempt]
    selection_pred: IntArray


def _train_candidate(
    parent: EdgeLine,
    knowledge: Knowledge,
    recipe: Recipe,
    fit: Split,
    selection: Split,
    selection_target: IntArray,
    plan: TrainingPlan,
    config: RDConfig,
    *,
    calibration: FloatArray,
    line: str,
    touched: set[int],
    progress: StageProgress,
) -> _Trained:
    """Teacher update towards p* and re-KD of the student, both on `fit`, then the guarded export."""
    cfg = recipe.rd(config)
    targets = KnowledgeTargets(parent.teacher, parent.student, knowledge, cfg)
    p_fit = F.softmax(targets(torch.from_numpy(fit.x)), dim=1).numpy()
    p_t = predict_proba(parent.teacher, fit.x)
    change = np.abs(p_fit - p_t).sum(axis=1)
    weights = (1.0 + cfg.beta * change).astype(np.float32)  # p* is p_T where nothing moved
    hard = p_fit.argmax(axis=1)
    if recipe.labels == "mapped":  # a moved sample keeps its target: the gate checks exactly that
        hard = np.where(change > 0, hard, knowledge.mapped_labels(fit.y))
    teacher_plan = plan.teacher_finetune
    if recipe.teacher_epochs is not None:
        teacher_plan = dataclasses.replace(teacher_plan, epochs=recipe.teacher_epochs)
    teacher = copy.deepcopy(parent.teacher)
    distill(  # towards p* at τ = 1 (+ the recipe's α·CE), on the samples (and shifted copies)
        teacher,
        targets,
        Split(x=fit.x, y=hard),
        dataclasses.replace(teacher_plan, augment=recipe.teacher_augment),
        KDConfig(alpha=recipe.teacher_alpha, tau=1.0),
        seed=plan.seed + 2,
        weights=weights,
        progress=partial(progress, "teacher"),
    )
    teacher.eval()
    class_map = knowledge.class_map()
    outputs = parent.artifact.manifest.class_of_output()
    version = parent.version + 1
    if recipe.train == "outputs":
        model_id = edge_model_id(line, version)
        mapping = class_map[outputs]
        artifact = relabelled(parent.artifact, mapping, model_id=model_id, line=line, version=version)
        progress("relabel", 1, 1)
        relabelled_line = EdgeLine(line, version, teacher, copy.deepcopy(parent.student), artifact)
        return _Trained(relabelled_line, [], artifact.load().predict(selection.x))
    # Re-KD from the updated teacher; with an anchor, the parent student's own outputs where the
    # parent teacher's decision is on a class the knowledge left alone.
    passthrough = dataclasses.replace(
        knowledge, preference=np.eye(len(knowledge.preference), dtype=np.float32), deltas=[]
    )
    source = KnowledgeTargets(
        teacher,
        parent.student,
        passthrough,
        cfg,
        anchor=parent.student if cfg.anchor != "none" else None,
        anchored_classes=set(touched) if cfg.anchor == "untouched" else set(),
        # which classes an input belongs to is the parent teacher's call, as in the knowledge: the
        # updated teacher may call a sample the knowledge moves by an untouched class's name
        anchor_by=parent.teacher,
        # the parent's doubts towards a class the user relabels follow the class map; noise in M̂'s
        # other rows stays out of the classes the knowledge leaves alone
        # (its outputs first pooled into the classes they stand for)
        anchor_map=np.eye(len(class_map), dtype=np.float32)[class_map[outputs]],
    )
    student = copy.deepcopy(parent.student)
    rekd_plan = plan.rekd
    if recipe.rekd_epochs is not None:
        rekd_plan = dataclasses.replace(rekd_plan, epochs=recipe.rekd_epochs)
    exact = False
    start = class_map[outputs] if recipe.head_init == "relabelled" else outputs
    if recipe.head_init == "relabelled" or (start != np.arange(len(start))).any():
        with torch.no_grad():
            floor = float(parent.student(torch.from_numpy(fit.x)).min())
        exact = relabel_head(student, start, floor)
    if recipe.train == "head":
        student.requires_grad_(False)  # Adam skips parameters without gradients
        student.head.requires_grad_(True)
    if not (exact and recipe.train == "head"):
        distill(
            student,
            source,
            Split(x=fit.x, y=hard),
            rekd_plan,
            plan.kd,
            seed=plan.seed + 3,
            weights=weights,
            progress=lambda d, t: progress("re-KD", d, t),
        )
    student.requires_grad_(True)
    student, artifact, attempts = export_guarded(
        student.eval(),
        calibration,
        Split(x=selection.x, y=selection_target),
        model_id=edge_model_id(line, version),
        line=line,
        version=version,
        max_drop=plan.max_int8_drop,
        pixel_scale=parent.artifact.manifest.pixel_scale,
        progress=partial(progress, "export"),
    )
    trained = EdgeLine(line, version, teacher, student, artifact, attempts)
    return _Trained(trained, attempts, artifact.load().predict(selection.x))


@torch.no_grad()
def relabel_head(student: EdgeStudent, mapping: IntArray, floor: float) -> bool:
    """Compose the student's head with a class map (`Knowledge.class_map`), in place; True if exact.

    Class j's row becomes the row of the class mapped onto it: a permutation of the classes (a swap,
    a cycle) is then the parent's own decisions relabelled, bit for bit on every other class. Rows
    mapped onto one class are summed (a starting point for training, not exact), and a class nothing
    maps onto gets a zero row with bias `floor` (the parent's lowest logit), so it is never top-1.
    """
    weight, bias = student.head.weight.clone(), student.head.bias.clone()
    exact = True
    for j in range(len(mapping)):
        sources = torch.from_numpy(np.flatnonzero(mapping == j))
        if len(sources) == 0:
            student.head.weight[j], student.head.bias[j] = 0.0, floor
        else:
            student.head.weight[j], student.head.bias[j] = weight[sources].sum(0), bias[sources].sum()
        exact = exact and len(sources) == 1
    return exact


def _score(check: GateVerdict, config: RDConfig) -> float:
    """How well a candidate met the gate's rules on the selection split: its smaller slack, each rule's
    margin as a share of its limit (positive when both hold)."""
    agreement = (
        -1.0
        if check.agreement is None
        else (check.agreement - config.agreement_min) / (1 - config.agreement_min)
    )
    if check.untouched_acc_parent is None or check.untouched_acc_candidate is None:
        return agreement
    drop = check.untouched_acc_parent - check.untouched_acc_candidate
    return min(agreement, (config.untouched_max_drop - drop) / config.untouched_max_drop)


def rd_cycle(
    parent: EdgeLine,
    payloads: list[bytes],
    transfer: Split,
    val: Split,
    plan: TrainingPlan,
    config: RDConfig,
    *,
    line: str | None = None,
    search: SearchConfig | None = None,
    progress: StageProgress = silent,
) -> CycleResult:
    """Serialized knowledge reports → RD update → candidates (re-KD, int8 export) chosen on a selection
    split of the transfer set → the gate on `val`, once (DESIGN §3 steps 5–7)."""
    search = search or SearchConfig()
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock
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

    line = line or parent.line
    recipes = [r for r in search.recipes if applies(r, knowledge)] or [REKD]
    fit_idx, sel_idx = _selection(len(transfer), search.selection_fraction, plan.seed)
    # With one recipe there is nothing to choose: it trains on everything, the selection split only
    # checks its export.
    fit = transfer if len(recipes) == 1 else Split(x=transfer.x[fit_idx], y=transfer.y[fit_idx])
    selection = Split(x=transfer.x[sel_idx], y=transfer.y[sel_idx])
    sel_target, sel_teacher = p_star[sel_idx].argmax(axis=1), p_t[sel_idx].argmax(axis=1)
    sel_parent = runtime.predict(selection.x)
    records: list[CandidateRecord] = []
    best: tuple[float, int, Recipe, EdgeLine] | None = None
    for recipe in recipes:
        if records and time.perf_counter() - started > search.budget_s:
            break
        recipe_clock = time.perf_counter()
        try:
            trained = _train_candidate(
                parent,
                knowledge,
                recipe,
                fit,
                selection,
                sel_target,
                plan,
                config,
                calibration=transfer.x,  # the parent's: a backbone left alone keeps its int8 features
                line=line,
                touched=touched,
                progress=progress,
            )
        except ExportGaveUp as exc:
            records.append(
                CandidateRecord(
                    recipe.name,
                    "export-failed",
                    str(exc),
                    None,
                    0,
                    None,
                    time.perf_counter() - recipe_clock,
                    [a.as_dict() for a in exc.attempts],
                )
            )
            lap("candidates")
            continue
        check = gate(
            val_labels=selection.y,
            parent_pred=sel_parent,
            candidate_pred=trained.selection_pred,
            target_top1=sel_target,
            teacher_top1=sel_teacher,
            touched=touched,
            config=config,
        )
        score = _score(check, config)
        records.append(
            CandidateRecord(
                recipe.name,
                "passed" if check.approved else "refused",
                check.reason,
                check.agreement,
                check.changed_samples,
                None
                if check.untouched_acc_parent is None or check.untouched_acc_candidate is None
                else check.untouched_acc_parent - check.untouched_acc_candidate,
                time.perf_counter() - recipe_clock,
                [a.as_dict() for a in trained.attempts],
            )
        )
        lap("candidates")
        if best is None or score > best[0]:
            best = (score, len(records) - 1, recipe, trained.line)
        if check.approved:
            break
    if best is None:
        reason = "every candidate's int8 export gave up: " + "; ".join(r.reason for r in records)
        return CycleResult("rejected", reason, None, None, moved, timings, records)
    _, chosen, recipe, candidate = best
    records[chosen] = dataclasses.replace(records[chosen], status="chosen")
    if search.retrain and fit is not transfer:  # the chosen recipe again, on the whole transfer set
        try:
            candidate = _train_candidate(
                parent,
                knowledge,
                recipe,
                transfer,
                selection,
                sel_target,
                plan,
                config,
                calibration=transfer.x,
                line=line,
                touched=touched,
                progress=progress,
            ).line
        except ExportGaveUp:  # keep the candidate the selection judged
            pass
    lap("final")

    p_t_val = predict_proba(parent.teacher, val.x)
    p_star_val, _ = soft_targets(knowledge, p_t_val, runtime.run(val.x)[0], head, config)
    verdict = gate(
        val_labels=val.y,
        parent_pred=runtime.predict(val.x),
        candidate_pred=candidate.artifact.load().predict(val.x),
        target_top1=p_star_val.argmax(axis=1),
        teacher_top1=p_t_val.argmax(axis=1),
        touched=touched,
        config=config,
        support=knowledge.support,
    )
    lap("gate")
    outcome: Literal["approved", "rejected"] = "approved" if verdict.approved else "rejected"
    return CycleResult(outcome, verdict.reason, candidate, verdict, moved, timings, records)
