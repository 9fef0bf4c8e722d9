"""The RD update (DESIGN §3 step 5): knowledge reports → robustly combined knowledge → soft targets p*."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from cloud.exceptions import KnowledgeError
from device_firmware_py.runtime import pool_outputs, softmax
from wire import ArtifactManifest, ContractError, KnowledgeReport

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
ROBUST_MIN_REPORTS = 3  # the median needs three; below, a clipped mean


@dataclass(frozen=True)
class RDConfig:
    """Knobs of the RD update, re-KD and gate; defaults from DESIGN §3, measured in the simulation."""

    # Prior pseudo-counts on the diagonal of the preference map: a class moves when the user's labels
    # for it outnumber its own by more than κ. Measured on the dev suite (seed 100, 24 scenarios): at
    # 5 a device of 20 samples (2 a class) never moved a class; at 2.5 two do; at 1 a user without a
    # preference, under input noise 2.0, had a class its model confuses moved (−8.5 points).
    kappa: float = 2.5
    # L1 change below which a transfer sample keeps the teacher's belief. Any change that flips a
    # confident decision moves ≥ 1.0, so θ < 1 only filters soft changes (measured: 0.7, not 0.3).
    theta: float = 0.7
    beta: float = 4.0  # re-KD weight 1 + β·‖p* − p_T‖₁
    # Re-KD: transfer samples of classes the knowledge leaves alone take the parent student's own
    # outputs as targets, so the new student keeps the parent's decisions there (the gate's untouched
    # classes). "unmoved" anchors every sample the knowledge did not move, "none" nothing.
    anchor: Literal["untouched", "unmoved", "none"] = "untouched"
    # How much of the head delta's per-sample change enters p_Δ. Measured on the dev suite at 0.3,
    # deltas fitted on a few noisy samples moved validation targets that no candidate followed (the
    # gate's agreement fell by up to 15 points); the class map alone carries the preference.
    delta_weight: float = 0.0
    # Moved samples' targets are sharpened, p ← p^(1/T) renormalized: their top-1 stays, its margin
    # grows, so the teacher and student learn a decision rather than a coin toss.
    target_temperature: float = 1.0
    # A noised (DP) count is evidence of a preference only this many σ above zero: the cohort's
    # noise is public, and at 4σ a cohort without a preference shows a false cell about once in
    # 300 maps of 90 off-diagonal cells.
    dp_evidence_sigmas: float = 4.0
    agreement_min: float = 0.95  # gate (a)
    untouched_max_drop: float = 0.010  # gate (b)


@dataclass(frozen=True)
class Knowledge:
    """The combined knowledge of one cohort against one base model."""

    base_model_id: str
    preference: FloatArray  # C×C row-stochastic M̂
    # C×C: which (model's top-1 → user's label) cells stand out of the reports' noise; without DP,
    # every off-diagonal cell with a count. Only these moves change a decision.
    support: npt.NDArray[np.bool_]
    noised: bool  # some report was noised for differential privacy
    deltas: list[tuple[FloatArray, FloatArray]]  # usable (ΔW, Δb), one per report
    report_count: int
    sample_count: int
    # The class each output of the base model stands for (its manifest's map); None is the identity.
    # The reports' head deltas move the outputs' beliefs, which this pools into classes.
    class_of_output: IntArray | None = None

    def pool(self, p: FloatArray) -> FloatArray:
        """Per-output probabilities of the base model pooled into classes."""
        return p if self.class_of_output is None else pool_outputs(p, self.class_of_output)

    def class_map(self) -> IntArray:
        """Each class to its row's top class of M̂ where the reports' evidence supports that move,
        else to itself: the knowledge read as a relabelling of the model's decisions."""
        top = self.preference.argmax(axis=1)
        moves = self.support[np.arange(len(top)), top]
        return np.where(moves, top, np.arange(len(top))).astype(np.int64)

    def mapped_labels(self, labels: IntArray) -> IntArray:
        """Presumed labels sent through the class map."""
        return self.class_map()[labels]


def parse_reports(payloads: list[bytes]) -> list[KnowledgeReport]:
    """Validate serialized reports; a bad one is a KnowledgeError naming its position and reason."""
    reports = []
    for i, payload in enumerate(payloads):
        try:
            reports.append(KnowledgeReport.from_bytes(payload))
        except ContractError as exc:
            raise KnowledgeError(f"report {i}: {exc}") from None
    return reports


def _robust_mean(stack: npt.NDArray[np.floating], ignore_nan: bool = False) -> FloatArray:
    """Coordinate-wise median over axis 0 with ≥ 3 entries, else the mean."""
    robust = len(stack) >= ROBUST_MIN_REPORTS
    if ignore_nan:
        center = np.nanmedian(stack, axis=0) if robust else np.nanmean(stack, axis=0)
    else:
        center = np.median(stack, axis=0) if robust else stack.mean(axis=0)
    out: FloatArray = center.astype(np.float32)
    return out


def combine_maps(counts: list[npt.NDArray[np.float64]], kappa: float) -> FloatArray:
    """The cohort's M̂ from its devices' count matrices, robust to a minority of bad devices.

    Each report's rows are normalized to frequencies (a row without samples says nothing) and
    combined coordinate-wise; the prior κ·I is then added once, against the cohort's evidence per
    row (the sum of row counts, or, from three reports up, the median row count of the devices that
    saw the class × their number), so a preference seen by many devices with a few samples each
    still counts as well as one device's. With one report this is exactly rownormalize(counts + κI).
    """
    stack = np.stack(counts)
    rows = stack.sum(axis=2)  # reports × C
    with np.errstate(invalid="ignore", divide="ignore"):
        freq = np.where(rows[:, :, None] > 0, stack / rows[:, :, None], np.nan)
    with warnings.catch_warnings():  # a row no report has samples for is all-NaN: handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        combined = _robust_mean(freq, ignore_nan=True).astype(np.float64)
    c = stack.shape[1]
    empty = np.isnan(combined).all(axis=1)
    combined[empty] = np.eye(c)[empty]
    combined = np.nan_to_num(combined, nan=0.0)
    combined /= np.maximum(combined.sum(axis=1, keepdims=True), 1e-12)
    if len(rows) >= ROBUST_MIN_REPORTS:  # as if every device that saw the class saw the median of them
        seen = rows > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            evidence = np.nanmedian(np.where(seen, rows, np.nan), axis=0) * seen.sum(axis=0)
    else:
        evidence = rows.sum(axis=0)
    evidence = np.where(empty, 0.0, evidence)
    m_hat = evidence[:, None] * combined + kappa * np.eye(c)
    out: FloatArray = (m_hat / m_hat.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def combine_noised_counts(
    counts: list[npt.NDArray[np.float64]], sigmas: list[float], kappa: float, evidence_sigmas: float
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """(M̂, support) from count matrices of which some carry Gaussian DP noise of known σ.

    Counts are pooled, not normalized per report: a device's row holds a few samples, which its
    noise swamps, while the cohort's sum (from three reports, the median × their number, so one
    device cannot steer it) keeps the signal and has noise σ·√K (× 1.25 for the median). An
    off-diagonal cell counts only where it stands `evidence_sigmas` above zero; the diagonal is
    kept (clipped at zero), so noise can weaken a class's own evidence but never invent a move.
    """
    stack = np.stack(counts)
    k = len(counts)
    if k >= ROBUST_MIN_REPORTS:
        pooled = np.median(stack, axis=0) * k
        sigma = 1.2533 * float(np.sqrt(np.mean(np.square(sigmas)) * k))
    else:
        pooled = stack.sum(axis=0)
        sigma = float(np.sqrt(np.sum(np.square(sigmas))))
    c = pooled.shape[0]
    diagonal = np.eye(c, dtype=bool)
    support = (pooled > evidence_sigmas * sigma) & ~diagonal
    kept = np.where(support | diagonal, np.clip(pooled, 0.0, None), 0.0) + kappa * np.eye(c)
    out: FloatArray = (kept / kept.sum(axis=1, keepdims=True)).astype(np.float32)
    return out, support


def _clip_norms(deltas: list[tuple[FloatArray, FloatArray]]) -> list[tuple[FloatArray, FloatArray]]:
    """Clip every Δ to the lower median of the Δ norms (with two reports: the smaller norm), so one
    report cannot dominate a clipped mean."""
    norms = [float(np.sqrt((w**2).sum() + (b**2).sum())) for w, b in deltas]
    bound = sorted(norms)[(len(norms) - 1) // 2]
    scale = [min(1.0, bound / n) if n > 0 else 1.0 for n in norms]
    return [(w * s, b * s) for (w, b), s in zip(deltas, scale, strict=True)]


def latest_per_device(reports: list[KnowledgeReport]) -> list[KnowledgeReport]:
    """One report per device, its latest: a redelivered message, or one device sending many,
    must not count as several votes in the median."""
    latest: dict[str, KnowledgeReport] = {}
    for r in reports:
        kept = latest.get(r.device_id)
        if kept is None or (r.sent_at, str(r.msg_id)) > (kept.sent_at, str(kept.msg_id)):
            latest[r.device_id] = r
    return sorted(latest.values(), key=lambda r: r.device_id)


def combine_reports(reports: list[KnowledgeReport], base: ArtifactManifest, config: RDConfig) -> Knowledge:
    """Combine one cohort's reports, all computed against `base`; refuse any that are not."""
    if not reports:
        raise KnowledgeError("no knowledge reports to combine")
    reports = latest_per_device(reports)
    for r in reports:
        if r.base_model_id != base.model_id:
            raise KnowledgeError(
                f"report {r.msg_id} was computed against {r.base_model_id}, not {base.model_id}"
            )
        if (r.num_classes, r.feature_dim) != (base.num_classes, base.feature_dim):
            raise KnowledgeError(f"report {r.msg_id} has the wrong shape for {base.model_id}")
    counts = [r.counts() for r in reports]
    noised = any(r.privacy is not None for r in reports)
    if noised:
        sigmas = [r.privacy.sigma_map if r.privacy is not None else 0.0 for r in reports]
        combined, support = combine_noised_counts(counts, sigmas, config.kappa, config.dp_evidence_sigmas)
    else:
        combined = combine_maps(counts, config.kappa)
        support = (np.sum(counts, axis=0) > 0) & ~np.eye(len(combined), dtype=bool)
    # A DP report's Δ is used only when it was sent (not when the whole budget went to the map).
    deltas = [r.head_delta() for r in reports if r.privacy is None or r.privacy.sigma_delta is not None]
    if 0 < len(deltas) < ROBUST_MIN_REPORTS:
        deltas = _clip_norms(deltas)
    return Knowledge(
        base_model_id=base.model_id,
        preference=combined,
        support=support,
        noised=noised,
        deltas=deltas,
        report_count=len(reports),
        sample_count=sum(r.sample_count for r in reports),
        class_of_output=None if base.output_classes is None else base.class_of_output(),
    )


def soft_targets(
    knowledge: Knowledge,
    p_teacher: FloatArray,
    features: FloatArray,
    head: tuple[FloatArray, FloatArray],
    config: RDConfig,
) -> tuple[FloatArray, FloatArray]:
    """(p*, ‖p* − p_T‖₁) per sample: the teacher's belief moved by the user's difference beyond θ.

    The two parts of the knowledge compose: the head delta corrects the teacher's belief at input
    level, `p_Δ = p_T + w·(p_S' − p_S)`, and the preference map then moves that belief at class
    level, `p = p_Δ·M̂`. A head delta fitted on few samples can then soften the map's verdict only
    by what it actually learned, never by a fixed share. A top-1 change moves the sample only when
    the reports' counts support it (`Knowledge.support`). `features` are the int8 artifact's
    features of the same inputs.
    """
    p_in = p_teacher
    if knowledge.deltas and config.delta_weight > 0:
        w, b = head
        p_s = softmax(features @ w.T + b)
        diffs = np.stack([softmax(features @ (w + dw).T + (b + db)) - p_s for dw, db in knowledge.deltas])
        diff = knowledge.pool(_robust_mean(diffs))
        # A delta adds belief only where the reports' evidence goes from the sample's own decision: a
        # broken or poisoned delta cannot feed a class that no label of that class went to.
        own = p_teacher.argmax(axis=1)
        towards = knowledge.support[own] | (np.arange(p_teacher.shape[1]) == own[:, None])
        diff = np.where(towards | (diff < 0), diff, 0.0)
        p_in = np.clip(p_teacher + config.delta_weight * diff, 0.0, None)
        p_in /= np.maximum(p_in.sum(axis=1, keepdims=True), 1e-12)
    p = p_in @ knowledge.preference
    change = np.abs(p - p_teacher).sum(axis=1)
    before, after = p_teacher.argmax(axis=1), p.argmax(axis=1)
    # A decision moves only along a cell of the reports' evidence: a head delta (or DP noise) cannot
    # send a sample to a class that no sample of that class was labelled as.
    supported = (before == after) | knowledge.support[before, after]
    moved = (change > config.theta) & supported
    if config.target_temperature != 1.0:
        p = np.power(np.clip(p, 1e-12, None), 1.0 / config.target_temperature)
        p /= p.sum(axis=1, keepdims=True)
    p_star = np.where(moved[:, None], p, p_teacher).astype(np.float32)
    return p_star, np.where(moved, change, 0.0).astype(np.float32)


def touched_classes(p_teacher: FloatArray, p_star: FloatArray) -> set[int]:
    """Classes the knowledge touches: both sides of every top-1 it changes."""
    before, after = p_teacher.argmax(axis=1), p_star.argmax(axis=1)
    changed = before != after
    return {int(c) for c in np.concatenate([before[changed], after[changed]])}
