"""The gate (DESIGN §3 step 7) on hand-built predictions: follow the knowledge, keep the rest."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cloud.ml.gate import GateVerdict, gate
from cloud.ml.rd_update import RDConfig

IntArray = npt.NDArray[np.int64]


def ints(values: list[int]) -> IntArray:
    return np.array(values, dtype=np.int64)


def dana_case(changed: int = 20, untouched: int = 200) -> dict[str, IntArray]:
    """Validation data for a 3→8 preference: `changed` samples of class 3 whose target the knowledge
    moved to 8, `untouched` samples of classes 0..2 and 4..7, 9, all predicted right by the parent."""
    others = np.array([c for c in range(10) if c not in (3, 8)], dtype=np.int64)
    untouched_labels = others[np.arange(untouched) % len(others)]
    labels = np.concatenate([np.full(changed, 3), untouched_labels]).astype(np.int64)
    teacher = labels.copy()
    target = np.where(labels == 3, 8, labels).astype(np.int64)
    return {
        "val_labels": labels,
        "parent_pred": labels.copy(),
        "candidate_pred": target.copy(),  # follows the knowledge everywhere
        "target_top1": target,
        "teacher_top1": teacher,
    }


def run_gate(case: dict[str, IntArray], touched: set[int] | None = None) -> GateVerdict:
    return gate(
        val_labels=case["val_labels"],
        parent_pred=case["parent_pred"],
        candidate_pred=case["candidate_pred"],
        target_top1=case["target_top1"],
        teacher_top1=case["teacher_top1"],
        touched={3, 8} if touched is None else touched,
        config=RDConfig(),
    )


def test_approves_a_candidate_that_follows_the_knowledge_and_keeps_the_rest() -> None:
    # Prepare
    case = dana_case()

    # Execute
    verdict = run_gate(case)

    # Assert
    assert verdict.approved
    assert verdict.changed_samples == 20
    assert verdict.agreement == 1.0
    assert verdict.untouched_samples == 200
    assert verdict.untouched_acc_parent == verdict.untouched_acc_candidate == 1.0
    assert verdict.as_dict()["approved"] is True


def test_rejects_a_candidate_that_ignores_the_knowledge() -> None:
    # Prepare: the candidate follows the knowledge on 18 of 20 changed samples (90 %)
    case = dana_case()
    case["candidate_pred"][:2] = 3

    # Execute
    verdict = run_gate(case)

    # Assert
    assert not verdict.approved
    assert verdict.agreement == 0.9
    assert "agrees with the knowledge" in verdict.reason
    assert "untouched" not in verdict.reason


def test_agreement_of_exactly_95_percent_is_enough() -> None:
    # Prepare: 19 of 20
    case = dana_case()
    case["candidate_pred"][0] = 3

    # Execute
    verdict = run_gate(case)

    # Assert
    assert verdict.agreement == 0.95
    assert verdict.approved


def test_agreement_is_checked_where_the_parent_read_the_sample_as_its_teacher_did() -> None:
    # Prepare: the parent misread 4 of the 20 changed samples (class 3 read as 5) and the candidate,
    # the parent relabelled 3 → 8, keeps those 4 readings; it follows the knowledge on the other 16
    case = dana_case()
    case["parent_pred"][:4] = 5
    case["candidate_pred"][:4] = 5

    # Execute
    verdict = run_gate(case)

    # Assert
    assert verdict.approved, verdict.reason
    assert verdict.changed_samples == 20
    assert verdict.checked_samples == 16
    assert verdict.agreement == 1.0
    assert verdict.agreement_all == 0.8


def test_a_candidate_that_stops_following_where_the_parent_read_right_is_refused() -> None:
    # Prepare: the parent read every changed sample as its teacher did; the candidate misses 2 of 20
    case = dana_case()
    case["candidate_pred"][:2] = 5

    # Execute
    verdict = run_gate(case)

    # Assert
    assert not verdict.approved
    assert verdict.checked_samples == 20
    assert verdict.agreement == verdict.agreement_all == 0.9
    assert "the parent read as its teacher did" in verdict.reason


def test_a_parent_that_read_no_changed_sample_as_its_teacher_leaves_nothing_to_check() -> None:
    # Prepare
    case = dana_case()
    case["parent_pred"][:20] = 5

    # Execute
    verdict = run_gate(case)

    # Assert
    assert not verdict.approved
    assert verdict.agreement is None
    assert verdict.agreement_all == 1.0
    assert "none can be checked" in verdict.reason


def test_rejects_a_candidate_that_loses_untouched_accuracy() -> None:
    # Prepare: 3 of 200 untouched samples go wrong (1.5 points)
    case = dana_case()
    case["candidate_pred"][20:23] = 9 - case["val_labels"][20:23]

    # Execute
    verdict = run_gate(case)

    # Assert
    assert not verdict.approved
    assert verdict.untouched_acc_candidate == 197 / 200
    assert "untouched-class accuracy falls" in verdict.reason
    assert "agrees" not in verdict.reason


def test_a_drop_under_one_point_is_tolerated() -> None:
    # Prepare: 1 of 200 untouched samples goes wrong (0.5 points)
    case = dana_case()
    case["candidate_pred"][20] = 9 - case["val_labels"][20]

    # Execute
    verdict = run_gate(case)

    # Assert
    assert verdict.approved
    assert verdict.untouched_acc_candidate == 199 / 200


def test_a_drop_of_exactly_one_point_is_within_the_limit() -> None:
    # Prepare: 2 of 200 untouched samples go wrong (exactly 1.0 point)
    case = dana_case()
    case["candidate_pred"][20:22] = 9 - case["val_labels"][20:22]

    # Execute
    verdict = run_gate(case)

    # Assert
    assert verdict.untouched_acc_candidate == 198 / 200
    assert verdict.approved, verdict.reason


def test_both_failures_are_reported() -> None:
    # Prepare
    case = dana_case()
    case["candidate_pred"][:10] = 3
    case["candidate_pred"][20:30] = 9 - case["val_labels"][20:30]

    # Execute
    verdict = run_gate(case)

    # Assert
    assert not verdict.approved
    assert "agrees with the knowledge" in verdict.reason
    assert "untouched-class accuracy" in verdict.reason


def test_untouched_accuracy_ignores_touched_classes() -> None:
    # Prepare: the candidate gets every touched-class sample "wrong" by the presumed labels (3 → 8)
    case = dana_case()

    # Execute
    verdict = run_gate(case, touched={3, 8})
    naive = run_gate(case, touched=set())

    # Assert: with the touched classes left out, nothing dropped; counted in, it would have
    assert verdict.approved
    assert not naive.approved
    assert naive.untouched_samples == 220


def test_no_changed_validation_sample_means_no_evidence_and_is_refused() -> None:
    # Prepare: the knowledge changed decisions on the transfer set but nothing on validation
    case = dana_case()
    case["target_top1"] = case["teacher_top1"].copy()
    case["candidate_pred"] = case["parent_pred"].copy()

    # Execute
    verdict = run_gate(case)

    # Assert
    assert verdict.changed_samples == 0
    assert verdict.agreement is None
    assert not verdict.approved
    assert "none can be checked" in verdict.reason


def test_no_untouched_samples_gives_no_untouched_accuracy() -> None:
    # Prepare: every validation sample belongs to a touched class
    case = dana_case(changed=20, untouched=0)

    # Execute
    verdict = run_gate(case)

    # Assert
    assert verdict.untouched_samples == 0
    assert verdict.untouched_acc_parent is None
    assert verdict.untouched_acc_candidate is None
    assert verdict.approved


def test_noised_knowledge_must_be_supported_by_the_reports_evidence() -> None:
    # Prepare: the knowledge moves 3 → 8 and the candidate follows it, but the reports' pooled counts
    # hold no evidence for 3 → 8 that stands out of their DP noise
    case = dana_case()
    unsupported = np.zeros((10, 10), dtype=bool)
    supported = unsupported.copy()
    supported[3, 8] = True

    # Execute
    refused = gate(**case, touched={3, 8}, config=RDConfig(), support=unsupported)
    approved = gate(**case, touched={3, 8}, config=RDConfig(), support=supported)

    # Assert
    assert not refused.approved
    assert refused.unsupported == 20
    assert "evidence" in refused.reason
    assert approved.approved
    assert approved.unsupported == 0
