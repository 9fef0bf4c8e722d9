"""The gate (DESIGN §3 step 7): a candidate edge model must carry the knowledge and keep the rest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from cloud.ml.rd_update import RDConfig

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision, its reason, and the figures behind it."""

    approved: bool
    reason: str
    changed_samples: int  # validation samples whose top-1 the knowledge changed
    agreement: float | None  # candidate's agreement with top-1 of p* on the checked ones
    untouched_samples: int
    untouched_acc_parent: float | None
    untouched_acc_candidate: float | None
    unsupported: int = 0  # changed validation samples whose move no noised evidence supports
    checked_samples: int = 0  # the changed samples the parent read as its teacher did: rule (a)'s
    agreement_all: float | None = None  # agreement on every changed sample, for the record

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def gate(
    *,
    val_labels: IntArray,
    parent_pred: IntArray,
    candidate_pred: IntArray,
    target_top1: IntArray,
    teacher_top1: IntArray,
    touched: set[int],
    config: RDConfig,
    support: npt.NDArray[np.bool_] | None = None,
) -> GateVerdict:
    """Approve a candidate when (a) it follows the knowledge and (b) untouched classes keep accuracy.

    With no validation sample to check (a) on, there is no evidence for the candidate: refused.

    Rule (a) is checked on the changed samples the parent read as its teacher did (the parent's top-1
    is the teacher's): elsewhere the target is a relabelling of a decision the parent never made, and
    a candidate that follows the knowledge exactly, the parent relabelled, would be held to the
    parent's own disagreement with its teacher. `agreement_all` keeps the share on every changed sample.

    Predictions are the int8 models' top-1 on the presumed validation split; `touched` is read from
    the knowledge (classes on either side of a top-1 it changed), never from a scenario.

    With `support` (the cells of the reports' pooled counts that stand out of their noise, which
    is public under DP and zero without), a third rule does not take the knowledge's targets on
    trust: every changed sample's move (teacher's top-1 → target) must be one the reports' evidence
    supports, on at least the agreement share of the changed samples. Noise that made up a
    preference fails it.
    """
    changed = target_top1 != teacher_top1
    checked = changed & (parent_pred == teacher_top1)
    follows = candidate_pred == target_top1
    agreement = float(follows[checked].mean()) if checked.any() else None
    agreement_all = float(follows[changed].mean()) if changed.any() else None
    untouched = ~np.isin(val_labels, sorted(touched))
    acc_parent = float((parent_pred[untouched] == val_labels[untouched]).mean()) if untouched.any() else None
    acc_cand = float((candidate_pred[untouched] == val_labels[untouched]).mean()) if untouched.any() else None
    unsupported = 0
    if support is not None and changed.any():
        unsupported = int((~support[teacher_top1[changed], target_top1[changed]]).sum())
    reasons = []
    if changed.any() and unsupported > (1 - config.agreement_min) * int(changed.sum()) + 1e-9:
        reasons.append(
            f"{unsupported} of {int(changed.sum())} changed validation samples move where the reports' "
            "evidence does not stand out of their noise"
        )
    if not changed.any():
        reasons.append("no validation sample has a decision the knowledge changes, so none can be checked")
    elif agreement is None:
        reasons.append(
            f"the parent reads none of the {int(changed.sum())} changed validation samples as its "
            "teacher does, so none can be checked"
        )
    elif agreement < config.agreement_min:
        reasons.append(
            f"agrees with the knowledge on {agreement:.1%} of {int(checked.sum())} changed validation "
            f"samples the parent read as its teacher did, needs {config.agreement_min:.0%}"
        )
    # The tolerance keeps a drop of exactly the limit (e.g. 2 of 200 samples) on the right side of it.
    if (
        acc_parent is not None
        and acc_cand is not None
        and acc_parent - acc_cand > config.untouched_max_drop + 1e-9
    ):
        reasons.append(
            f"untouched-class accuracy falls from {acc_parent:.1%} to {acc_cand:.1%} "
            f"(limit {config.untouched_max_drop:.1%})"
        )
    approved = not reasons
    reason = "; ".join(reasons) if reasons else "follows the knowledge and keeps untouched classes"
    return GateVerdict(
        approved=approved,
        reason=reason,
        changed_samples=int(changed.sum()),
        agreement=agreement,
        untouched_samples=int(untouched.sum()),
        untouched_acc_parent=acc_parent,
        untouched_acc_candidate=acc_cand,
        unsupported=unsupported,
        checked_samples=int(checked.sum()),
        agreement_all=agreement_all,
    )
