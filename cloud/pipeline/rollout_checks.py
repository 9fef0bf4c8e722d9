"""What a rollout is planned and judged by: the plan (waves, thresholds, timings), a wave's telemetry
under the new model against the same devices' telemetry before it was offered, and the verdict on a
wave (halt, go on, or when to look again)."""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from cloud.registry.rollouts import wave_targets
from cloud.registry.tables import Rollout, RolloutTarget, TargetState, Telemetry

DAY_S = 86_400.0
Fraction = Annotated[float, Field(gt=0, le=1)]


class RolloutPlan(BaseModel):
    """How a rollout goes: a canary wave, then further waves, and when it halts. Stored in `Rollout.waves`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    canary: int = Field(1, ge=0, le=1000, description="devices in the first wave (0: no canary)")
    waves: (
        Annotated[int, Field(ge=1, le=100)] | Annotated[list[Fraction], Field(min_length=1, max_length=100)]
    ) = Field(
        2,
        description="the waves after the canary: how many (equal shares), or the cumulative fraction of "
        "the remaining devices each reaches, increasing to 1 (e.g. [0.1, 0.5, 1])",
    )
    max_failed_fraction: float = Field(
        0.0, ge=0, le=1, description="failed installs in a wave above this fraction halt (0: any failure)"
    )
    confidence_drop: float = Field(
        0.10, ge=0, le=1, description="halt when the wave's mean confidence falls by more than this"
    )
    error_rate_rise: float = Field(
        0.10, ge=0, le=1, description="halt when the wave's error rate (1 - accuracy) rises by more than this"
    )
    observe_s: float = Field(60.0, ge=0, le=7 * DAY_S, description="how long a settled wave is watched")
    min_status: int = Field(
        3, ge=1, le=10_000, description="status windows a device needs, before and after, to be judged"
    )
    wave_timeout_s: float = Field(
        900.0,
        ge=0,
        le=7 * DAY_S,
        description="after this, devices that have not answered the offer (or sent enough status) no "
        "longer hold the next wave back",
    )
    baseline_s: float = Field(
        3600.0,
        gt=0,
        le=30 * DAY_S,
        description="how far before the offer a device's telemetry is its baseline",
    )

    @model_validator(mode="after")
    def _increasing_to_one(self) -> Self:
        if isinstance(self.waves, list):
            if any(b <= a for a, b in zip(self.waves, self.waves[1:], strict=False)):
                raise ValueError("wave fractions must increase")
            if self.waves[-1] != 1:
                raise ValueError("the last wave fraction must be 1 (every device)")
        return self

    def fractions(self) -> list[float]:
        """The cumulative fraction of the devices after the canary that each further wave reaches."""
        if isinstance(self.waves, int):
            return [(i + 1) / self.waves for i in range(self.waves)]
        return list(self.waves)

    def split(self, device_ids: Sequence[str]) -> list[list[str]]:
        """The devices in waves, in the order given: the canary first; no empty wave."""
        canary, rest = list(device_ids[: self.canary]), list(device_ids[self.canary :])
        waves, start = [canary], 0
        for fraction in self.fractions():
            end = min(len(rest), math.ceil(fraction * len(rest) - 1e-9))
            waves.append(rest[start:end])
            start = end
        return [wave for wave in waves if wave]


@dataclass(frozen=True)
class WaveHealth:
    """The telemetry of a wave's installed devices, under the new model against their baseline."""

    judged: int = 0  # devices with enough status windows both before the offer and after
    waiting: int = 0  # devices with a baseline but not yet enough windows under the new model
    confidence_before: float | None = None
    confidence_after: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    degraded: str = ""  # why the wave is worse, or ""

    def as_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def wave_health(session: Session, rollout: Rollout, plan: RolloutPlan, offered_at: datetime) -> WaveHealth:
    """The current wave's installed devices: their status windows under the new model since the offer
    against those under their previous model in the `baseline_s` before it. A device counts when it
    has `min_status` windows on both sides; the wave's figures are the means over those devices."""
    after = _per_device(session, rollout, Telemetry.model_id == rollout.model_id, Telemetry.at >= offered_at)
    before = _per_device(
        session,
        rollout,
        Telemetry.model_id == RolloutTarget.previous_model_id,
        Telemetry.at >= offered_at - timedelta(seconds=plan.baseline_s),
        Telemetry.at < offered_at,
    )
    n = plan.min_status
    baseline = {d for d, row in before.items() if row[0] >= n}
    judged = sorted(d for d in baseline if d in after and after[d][0] >= n)
    conf = _paired([(before[d][1], before[d][2], after[d][1], after[d][2]) for d in judged], n)
    acc = _paired([(before[d][3], before[d][4], after[d][3], after[d][4]) for d in judged], n)
    worse = []
    if conf is not None and conf[0] - conf[1] > plan.confidence_drop:
        worse.append(
            f"mean confidence fell from {conf[0]:.3f} to {conf[1]:.3f} (limit {plan.confidence_drop})"
        )
    if acc is not None and acc[0] - acc[1] > plan.error_rate_rise:
        worse.append(
            f"error rate rose from {1 - acc[0]:.3f} to {1 - acc[1]:.3f} (limit {plan.error_rate_rise})"
        )
    return WaveHealth(
        judged=len(judged),
        waiting=len(baseline) - len(judged),
        confidence_before=None if conf is None else conf[0],
        confidence_after=None if conf is None else conf[1],
        accuracy_before=None if acc is None else acc[0],
        accuracy_after=None if acc is None else acc[1],
        degraded=f"{' and '.join(worse)} over {len(judged)} devices" if worse else "",
    )


# windows; then the count and mean of its confidences; then of its accuracies
_Windows = tuple[int, int, float | None, int, float | None]


def _per_device(session: Session, rollout: Rollout, *conditions: Any) -> dict[str, _Windows]:
    """The status windows of the current wave's installed devices that meet `conditions`, per device."""
    query = (
        select(
            Telemetry.device_id,
            func.count(),
            func.count(Telemetry.mean_confidence),
            func.avg(Telemetry.mean_confidence),
            func.count(Telemetry.accuracy),
            func.avg(Telemetry.accuracy),
        )
        .join(
            RolloutTarget,
            and_(
                RolloutTarget.device_id == Telemetry.device_id,
                RolloutTarget.rollout_id == rollout.id,
                RolloutTarget.wave == rollout.current_wave,
                RolloutTarget.state == TargetState.installed,
            ),
        )
        .where(*conditions)
        .group_by(Telemetry.device_id)
    )
    return {
        row[0]: (int(row[1]), int(row[2]), _float(row[3]), int(row[4]), _float(row[5]))
        for row in session.execute(query)
    }


def _paired(
    rows: Iterable[tuple[int, float | None, int, float | None]], n: int
) -> tuple[float, float] | None:
    """The mean before and after over the devices with `n` values of the metric on both sides."""
    pairs = [(b, a) for nb, b, na, a in rows if nb >= n and na >= n and b is not None and a is not None]
    if not pairs:
        return None
    return sum(b for b, _ in pairs) / len(pairs), sum(a for _, a in pairs) / len(pairs)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# --- judging the current wave --------------------------------------------------------------------------

FAILED = (TargetState.failed, TargetState.rolled_back)  # a device-side rollback is a failed install
# While a wave has installed devices their telemetry may turn worse: a pass judges its health again this
# often, though no ack came (status windows come every ~10 s, and `min_status` of them are needed).
HEALTH_EVERY_S = 10.0


@dataclass(frozen=True)
class Verdict:
    """What the pass makes of the current wave."""

    halt: str = ""  # why the rollout halts, or ""
    ready: bool = False  # the wave is done: the next one may start
    recheck_at: datetime | None = None  # not ready: when to judge again though no ack comes


def judge(
    session: Session, rollout: Rollout, plan: RolloutPlan, counts: dict[TargetState, int], now: datetime
) -> Verdict:
    """Judge the current wave (none of it pending) from its targets' states and its telemetry."""
    wave_no = rollout.current_wave
    stage = stage_of(rollout, wave_no)
    offered_at = parse_time(stage.get("offered_at")) or now
    size, failed = sum(counts.values()), sum(counts[s] for s in FAILED)
    if failed > plan.max_failed_fraction * size:
        first = wave_targets(session, rollout.id, wave_no, FAILED, limit=5)
        reasons = "; ".join(f"{t.device_id}: {t.reason or t.state.value}" for t in first)
        return Verdict(
            halt=f"wave {wave_no}: {failed} of {size} installs failed "
            f"(at most {plan.max_failed_fraction:.0%} allowed) — {reasons}"
        )
    health = wave_health(session, rollout, plan, offered_at)
    if health.as_json() != stage.get("health"):
        set_stage(rollout, wave_no, health=health.as_json())
    if health.degraded:
        return Verdict(halt=f"wave {wave_no}: {health.degraded}")
    # Acks set the flags that bring the next pass; until one comes, only time or telemetry can change
    # the verdict: the wave's next deadline, or its health's next check while it has installed devices.
    health_at = now + timedelta(seconds=HEALTH_EVERY_S) if counts[TargetState.installed] else None

    def wait(until: datetime) -> Verdict:
        return Verdict(recheck_at=until if health_at is None else min(until, health_at))

    answered = counts[TargetState.offered] == 0
    timeout = offered_at + timedelta(seconds=plan.wave_timeout_s)
    if not answered and now < timeout:
        return wait(timeout)
    settled_at = parse_time(stage.get("settled_at"))
    if settled_at is None:
        settled_at = now
        set_stage(rollout, wave_no, settled_at=now.isoformat())
    observed = settled_at + timedelta(seconds=plan.observe_s)
    if now < observed:
        return wait(observed)
    if health.waiting and now < observed + timedelta(seconds=plan.wave_timeout_s):
        return wait(observed + timedelta(seconds=plan.wave_timeout_s))
    return Verdict(ready=True)


# --- the plan document stored in `Rollout.waves`: {"plan": RolloutPlan, "stages": [one per wave]} ------


def plan_of(rollout: Rollout) -> RolloutPlan:
    """The rollout's plan; one stored without a plan (made by the registry alone) has the defaults."""
    return RolloutPlan.model_validate(rollout.waves.get("plan") or {})


def new_stage(size: int) -> dict[str, Any]:
    """A wave's stage before it is offered: its size, and when it was offered and settled, and its health."""
    return {"size": size, "offered_at": None, "settled_at": None, "health": None}


def stage_of(rollout: Rollout, wave: int) -> dict[str, Any]:
    """A copy of the wave's stage ({} for a wave with none)."""
    stages = rollout.waves.get("stages") or []
    return dict(stages[wave]) if wave < len(stages) else {}


def set_stage(rollout: Rollout, wave: int, **values: Any) -> None:
    """Set values of the wave's stage."""
    # A new dict for the JSON column: changing it in place would not be noticed by the ORM.
    stages = [dict(s) for s in rollout.waves.get("stages") or []]
    stages += [{} for _ in range(wave + 1 - len(stages))]
    stages[wave] = {**stages[wave], **values}
    rollout.waves = {**rollout.waves, "stages": stages}


def parse_time(value: Any) -> datetime | None:
    """A time stored in a stage (ISO 8601), or None."""
    return datetime.fromisoformat(value) if isinstance(value, str) else None
