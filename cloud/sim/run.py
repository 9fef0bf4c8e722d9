"""Runs the learning loop for every user of a scenario and measures it against its baselines.

The devices here run the device package's own code (int8 runtime, RD, DP) and the cloud sees only
their serialized knowledge reports; labels and samples stay on the simulated device.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from cloud.exceptions import ExportGaveUp
from cloud.ml.cycle import CycleResult, rd_cycle
from cloud.ml.data import ScenarioData, Split, UserData, build_scenario_data, to_user_scenario
from cloud.ml.distill import distill, train_classifier
from cloud.ml.export import export_int8, float_file_bytes, int8_accuracy, weight_tensor_bytes
from cloud.ml.families import NetSpec, default_family
from cloud.ml.line import EdgeLine, StageProgress, TrainingPlan, plan_for, silent, train_line
from cloud.ml.nets import parameter_count
from cloud.ml.rd_update import RDConfig
from cloud.ml.scenario import Scenario, UserSpec
from device_firmware_py.exceptions import NotEnoughSamplesError
from device_firmware_py.privacy import DPConfig, PrivacyAccountant
from device_firmware_py.rd import RDPolicy, extract_knowledge
from device_firmware_py.runtime import Int8Model
from wire import KnowledgeReport
from wire.manifest import edge_model_id

MIN_GAIN_FOR_GAP = 0.02  # DESIGN §3: gap_closed is null when the oracle gains less than this
DP_BUDGET_EPSILON = 8.0
INT8_FIGURES = (
    "float_acc",
    "int8_acc",
    "float_weight_bytes",
    "int8_weight_bytes",
    "float_file_bytes",
    "int8_file_bytes",
)


@dataclass(frozen=True)
class SimConfig:
    """Everything the simulation can be tuned with; defaults are the product's defaults."""

    plan: TrainingPlan | None = None  # None: the family's (line.plan_for)
    rd: RDConfig = RDConfig()
    policy: RDPolicy = RDPolicy()
    dp: DPConfig = DPConfig()
    raw_upload: bool = True  # the raw-upload baseline; a benchmark may skip it (acc_raw is then None)


@dataclass
class SimResult:
    """The figures of one run, shaped as RESULT.json."""

    scenario: str
    users: list[dict[str, Any]]
    int8: dict[str, Any]  # the base edge model's figures (None when its export gave up) and "export"
    timings_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "users": self.users,
            "int8": self.int8,
            "timings_s": self.timings_s,
        }


def accuracy(model: Int8Model, data: Split, mask: np.ndarray | None = None) -> float:
    """Top-1 accuracy of an int8 model, optionally on a subset."""
    pred = model.predict(data.x)
    hit = pred == data.y
    return float(hit[mask].mean() if mask is not None else hit.mean())


def _device_reports(
    v1: Int8Model, user: UserSpec, pools: list[Split], policy: RDPolicy, dp: DPConfig | None, seed: int
) -> list[bytes]:
    """Each device of the user runs RD on its own private pool; those with too few samples send nothing."""
    payloads = []
    for k, pool in enumerate(pools):
        accountant = PrivacyAccountant(DP_BUDGET_EPSILON, dp.delta) if dp else None
        try:
            report = extract_knowledge(
                v1,
                pool.x,
                pool.y,
                device_id=f"{user.id}-d{k}",
                policy=policy,
                dp=dp,
                accountant=accountant,
                seed=seed + k,
                # seeded DP noise only because this is a repeatable simulation; devices never do this
                noise_rng=np.random.default_rng([seed, k, 7]),
            )
        except NotEnoughSamplesError:
            continue
        payloads.append(report.to_bytes())
    return payloads


def _device_only_accuracy(v1: Int8Model, payloads: list[bytes], world: Split) -> float | None:
    """Mean accuracy of each device's own fine-tuned head h+Δ on v1's int8 features."""
    feats = v1.run(world.x)[0]
    w, b = v1.head()
    classes = v1.manifest.class_of_output()
    accs = []
    for payload in payloads:
        dw, db = KnowledgeReport.from_bytes(payload).head_delta()
        accs.append(float((classes[(feats @ (w + dw).T + (b + db)).argmax(axis=1)] == world.y).mean()))
    return float(np.mean(accs)) if accs else None


def _raw_upload_line(
    base: EdgeLine,
    data: ScenarioData,
    raw: Split,
    plan: TrainingPlan,
    line: str,
    progress: StageProgress,
) -> EdgeLine:
    """The reference that gives up privacy: the same cloud training fed the raw private samples.

    The raw samples make up half of every batch, in the teacher update and in the KD.
    """
    teacher = copy.deepcopy(base.teacher)
    train_classifier(
        teacher,
        data.train,
        plan.teacher_finetune,
        seed=plan.seed + 2,
        extra=raw,
        progress=partial(progress, "teacher"),
    )
    student = copy.deepcopy(base.student)
    distill(
        student,
        teacher.eval(),
        data.train,
        plan.rekd,
        plan.kd,
        seed=plan.seed + 3,
        extra=raw,
        progress=partial(progress, "distill"),
    )
    artifact = export_int8(
        student.eval(),
        data.train.x,
        model_id=edge_model_id(line, 2),
        line=line,
        version=2,
        pixel_scale=data.pixel_scale,
    )
    return EdgeLine(line, 2, teacher, student, artifact)


def _world_is_presumed(user: UserSpec) -> bool:
    """Whether the user's world is the presumed one: no class relabelled, no input noise."""
    return user.noise_std == 0 and all(src == dst for src, dst in user.label_map.items())


def _simulate_user(
    index: int,
    user_data: UserData,
    data: ScenarioData,
    base: EdgeLine,
    spec: NetSpec,
    cfg: SimConfig,
    plan: TrainingPlan,
    progress: StageProgress,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One user's loop and baselines, trained as `plan` says."""
    user, world = user_data.spec, user_data.world_test
    timings: dict[str, float] = {}
    v1 = base.artifact.load()
    touched = set(user.label_map) | set(user.label_map.values())
    untouched = ~np.isin(world.y, sorted(touched))

    def stage(name: str) -> StageProgress:
        return lambda s, d, t: progress(f"{user.id}: {name} {s}", d, t)

    seed = plan.seed + 1000 * (index + 1)
    payloads = _device_reports(v1, user, user_data.device_train, cfg.policy, None, seed)
    started = time.perf_counter()
    cycle = (
        rd_cycle(base, payloads, data.train, data.val, plan, cfg.rd, line=user.id, progress=stage("DiReDi"))
        if payloads
        else None
    )
    knowledge_to_approved = time.perf_counter() - started
    v2 = cycle.approved.artifact.load() if cycle and cycle.approved else v1

    dp_payloads = _device_reports(v1, user, user_data.device_train, cfg.policy, cfg.dp, seed)
    dp_cycle = (
        rd_cycle(
            base,
            dp_payloads,
            data.train,
            data.val,
            plan,
            cfg.rd,
            line=f"{user.id}-dp",
            progress=stage("DP"),
        )
        if dp_payloads
        else None
    )
    v2_dp = dp_cycle.approved.artifact.load() if dp_cycle and dp_cycle.approved else v1
    timings["diredi_cycle"] = knowledge_to_approved

    acc_raw = None
    if cfg.raw_upload:
        clock = time.perf_counter()
        raw = Split(
            x=np.concatenate([p.x for p in user_data.device_train]),
            y=np.concatenate([p.y for p in user_data.device_train]),
        )
        raw_line = _raw_upload_line(base, data, raw, plan, f"{user.id}-raw", stage("raw upload"))
        acc_raw = accuracy(raw_line.artifact.load(), world)
        timings["raw_upload"] = time.perf_counter() - clock

    clock = time.perf_counter()
    acc_v1, acc_v2 = accuracy(v1, world), accuracy(v2, world)
    if _world_is_presumed(user):
        # The manufacturer's model was trained on this user's world already: v1 is the oracle (a
        # second training would differ from it by its seed only).
        acc_oracle = acc_v1
    else:
        oracle_train = to_user_scenario(data.train, user, data.input_scale, np.random.default_rng([seed, 99]))
        oracle = train_line(
            oracle_train, spec, plan, line=f"{user.id}-oracle", val=None, progress=stage("oracle")
        )
        acc_oracle = accuracy(oracle.artifact.load(), world)
    timings["oracle"] = time.perf_counter() - clock

    gain = acc_oracle - acc_v1
    per_report = max((len(p) for p in payloads), default=0)
    samples_per_device = max(len(p) for p in user_data.device_train)
    result = {
        "id": user.id,
        "devices": user.devices,
        "reports": len(payloads),
        "acc_v1": acc_v1,
        "acc_local": _device_only_accuracy(v1, payloads, world),
        "acc_v2": acc_v2,
        "acc_raw": acc_raw,
        "acc_oracle": acc_oracle,
        "acc_dp": accuracy(v2_dp, world),
        "dp_epsilon": cfg.dp.epsilon,
        "dp_delta": cfg.dp.delta,
        "gap_closed": (acc_v2 - acc_v1) / gain if gain >= MIN_GAIN_FOR_GAP else None,
        "untouched_acc_v1": accuracy(v1, world, untouched),
        "untouched_acc_v2": accuracy(v2, world, untouched),
        "knowledge_bytes": per_report,
        "edge_weights_bytes": parameter_count(base.student) * 4,
        # What the device would upload instead: its float32 inputs and one byte of label each.
        "raw_private_bytes": samples_per_device * (int(np.prod(spec.input_shape)) * 4 + 1),
        "knowledge_to_approved_s": knowledge_to_approved if cycle and cycle.approved else None,
        "gate": _gate_summary(cycle),
        "gate_dp": _gate_summary(dp_cycle),
        "candidates": [c.as_dict() for c in cycle.candidates] if cycle else [],
        "candidates_dp": [c.as_dict() for c in dp_cycle.candidates] if dp_cycle else [],
        # How the chosen candidate was quantized (none when no candidate was made)
        "export": [a.as_dict() for a in cycle.candidate.export] if cycle and cycle.candidate else [],
    }
    return result, timings


def _unexported_user(user_data: UserData, spec: NetSpec, cfg: SimConfig, exc: ExportGaveUp) -> dict[str, Any]:
    """A user's row when the base model has no int8 export, so there is no v1 to run or improve."""
    user = user_data.spec
    gate = {"outcome": "export-failed", "reason": f"the base model has no int8 edge model: {exc}"}
    samples_per_device = max(len(p) for p in user_data.device_train)
    return {
        "id": user.id,
        "devices": user.devices,
        "reports": 0,
        **dict.fromkeys(("acc_v1", "acc_local", "acc_v2", "acc_raw", "acc_oracle", "acc_dp")),
        "dp_epsilon": cfg.dp.epsilon,
        "dp_delta": cfg.dp.delta,
        "gap_closed": None,
        "untouched_acc_v1": None,
        "untouched_acc_v2": None,
        "knowledge_bytes": 0,
        "edge_weights_bytes": parameter_count(spec.build()[1]) * 4,
        "raw_private_bytes": samples_per_device * (int(np.prod(spec.input_shape)) * 4 + 1),
        "knowledge_to_approved_s": None,
        "gate": gate,
        "gate_dp": gate,
        "candidates": [],
        "candidates_dp": [],
        "export": [a.as_dict() for a in exc.attempts],
    }


def _gate_summary(cycle: CycleResult | None) -> dict[str, Any]:
    """The cycle's outcome and reason, with the gate's verdict when a candidate reached the gate."""
    if cycle is None:
        return {"outcome": "no-report", "reason": "no device had enough labelled samples"}
    summary: dict[str, Any] = {
        "outcome": cycle.outcome,
        "reason": cycle.reason,
        "moved": cycle.moved_transfer_samples,
    }
    if cycle.verdict is not None:
        summary.update(cycle.verdict.as_dict())
    return summary


def run_simulation(
    scenario: Scenario, cfg: SimConfig | None = None, progress: StageProgress = silent
) -> SimResult:
    """The whole loop for every user of `scenario`, with every baseline of DESIGN §3."""
    cfg = cfg or SimConfig()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    data = build_scenario_data(scenario)
    spec = NetSpec(scenario.family or default_family(data.input_shape), data.input_shape, data.num_classes)
    timings["data"] = time.perf_counter() - clock
    # Every seed derives from the scenario's, so a scenario file fixes every figure of the run.
    plan = dataclasses.replace(cfg.plan or plan_for(spec), seed=scenario.seed)

    clock = time.perf_counter()
    try:
        base = train_line(
            data.train,
            spec,
            plan,
            line="base",
            val=data.val,
            pixel_scale=data.pixel_scale,
            progress=lambda s, d, t: progress(f"cloud KD: {s}", d, t),
        )
    except ExportGaveUp as exc:  # no v1: an outcome of the scenario, reported on every user's row
        timings["kd_and_export"] = time.perf_counter() - clock
        int8: dict[str, Any] = dict.fromkeys(INT8_FIGURES)
        int8["export"] = [a.as_dict() for a in exc.attempts]
        users = [_unexported_user(u, spec, cfg, exc) for u in data.users]
        return SimResult(scenario=scenario.name, users=users, int8=int8, timings_s=timings)
    float_acc, int8_acc = int8_accuracy(base.artifact, base.student, data.test)
    timings["kd_and_export"] = time.perf_counter() - clock
    int8 = {
        "float_acc": float_acc,
        "int8_acc": int8_acc,
        "float_weight_bytes": parameter_count(base.student) * 4,
        "int8_weight_bytes": weight_tensor_bytes(base.artifact.model),
        "float_file_bytes": float_file_bytes(base.student, data.input_shape),
        "int8_file_bytes": len(base.artifact.model),
        "export": [a.as_dict() for a in base.export],
    }
    users = []
    for i, user_data in enumerate(data.users):
        clock = time.perf_counter()
        result, user_timings = _simulate_user(i, user_data, data, base, spec, cfg, plan, progress)
        users.append(result)
        timings.update({f"{user_data.spec.id}.{k}": v for k, v in user_timings.items()})
        timings[f"{user_data.spec.id}.total"] = time.perf_counter() - clock
    return SimResult(scenario=scenario.name, users=users, int8=int8, timings_s=timings)
