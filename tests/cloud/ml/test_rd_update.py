"""The RD update (DESIGN §3 step 5): knowledge reports → robust combination → soft targets p*."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pytest

from cloud.exceptions import KnowledgeError
from cloud.ml.distill import predict_proba
from cloud.ml.rd_update import (
    Knowledge,
    RDConfig,
    combine_reports,
    parse_reports,
    soft_targets,
    touched_classes,
)
from wire import EncodedArray, KnowledgeMetrics, KnowledgeReport, PrivacyStatement

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData
    from cloud.ml.line import EdgeLine
    from device_firmware_py.runtime import Int8Model
    from wire import ArtifactManifest

FloatArray = npt.NDArray[np.float32]
C, D = 10, 64


def diagonal_counts(per_class: int = 20, classes: int = C) -> npt.NDArray[np.int32]:
    """A user who agrees with the model: every private sample's top-1 is its label."""
    return (np.eye(classes) * per_class).astype(np.int32)


def preference_counts(moved: int, src: int = 3, dst: int = 8, per_class: int = 20) -> npt.NDArray[np.int32]:
    """A user who labels `src` as `dst`: row `src` (model says src) puts `moved` counts in column `dst`."""
    counts = diagonal_counts(per_class)
    counts[src, src] = 0
    counts[src, dst] = moved
    return counts


def make_report(
    model_id: str,
    counts: npt.ArrayLike,
    *,
    delta_w: npt.ArrayLike | None = None,
    delta_b: npt.ArrayLike | None = None,
    privacy: PrivacyStatement | None = None,
    sample_count: int | None = None,
    feature_dim: int = D,
    device_id: str = "dana-d0",
) -> KnowledgeReport:
    """A report against `model_id`: int32 counts (float32 under DP), float16 head delta (zero by default)."""
    counts_arr = np.asarray(counts)
    classes = counts_arr.shape[0]
    dw = np.zeros((classes, feature_dim)) if delta_w is None else np.asarray(delta_w)
    db = np.zeros(classes) if delta_b is None else np.asarray(delta_b)
    return KnowledgeReport(
        device_id=device_id,
        base_model_id=model_id,
        num_classes=classes,
        feature_dim=feature_dim,
        sample_count=int(round(float(counts_arr.sum()))) if sample_count is None else sample_count,
        preference_map=EncodedArray.from_numpy(counts_arr, "float32" if privacy else "int32"),
        delta_weight=EncodedArray.from_numpy(dw, "float16"),
        delta_bias=EncodedArray.from_numpy(db, "float16"),
        metrics=None
        if privacy
        else KnowledgeMetrics(holdout_size=10, holdout_acc_before=0.5, holdout_acc_after=0.9),
        privacy=privacy,
    )


def privacy(sigma_map: float, sigma_delta: float | None) -> PrivacyStatement:
    return PrivacyStatement(
        epsilon=4.0,
        delta=1e-5,
        rho=0.2,
        sigma_map=sigma_map,
        sigma_delta=sigma_delta,
        clip_norm=1.0,
        spent_epsilon=4.0,
    )


def delta_with_norm(norm: float, row: int = 0) -> tuple[FloatArray, FloatArray]:
    """A head delta of exactly `norm` (representable in float16), all on one weight."""
    dw = np.zeros((C, D), dtype=np.float32)
    dw[row, 0] = norm
    return dw, np.zeros(C, dtype=np.float32)


def delta_norm(delta: tuple[FloatArray, FloatArray]) -> float:
    w, b = delta
    return float(np.sqrt((w.astype(np.float64) ** 2).sum() + (b.astype(np.float64) ** 2).sum()))


def confident_probs(top1: npt.NDArray[np.int64], confidence: float = 0.91) -> FloatArray:
    """Teacher probabilities: `confidence` on each sample's top-1, the rest spread evenly."""
    rest = (1.0 - confidence) / (C - 1)
    p = np.full((len(top1), C), rest, dtype=np.float32)
    p[np.arange(len(top1)), top1] = confidence
    return p


def knowledge_of(manifest: ArtifactManifest, counts: npt.ArrayLike) -> Knowledge:
    return combine_reports([make_report(manifest.model_id, counts)], manifest, RDConfig())


def test_combine_refuses_no_reports(base_line: EdgeLine) -> None:
    # Execute
    with pytest.raises(KnowledgeError, match="no knowledge reports"):
        combine_reports([], base_line.artifact.manifest, RDConfig())


def test_combine_refuses_a_report_against_another_base_model(base_line: EdgeLine) -> None:
    # Prepare
    manifest = base_line.artifact.manifest
    good = make_report(manifest.model_id, diagonal_counts())
    stale = make_report("base.v0", diagonal_counts(), device_id="dana-d1")

    # Execute
    with pytest.raises(KnowledgeError) as caught:
        combine_reports([good, stale], manifest, RDConfig())

    # Assert
    assert "base.v0" in str(caught.value)
    assert str(stale.msg_id) in str(caught.value)


@pytest.mark.parametrize(
    ("classes", "feature_dim"), [(5, D), (C, 32)], ids=["wrong-num-classes", "wrong-feature-dim"]
)
def test_combine_refuses_a_report_of_the_wrong_shape(
    base_line: EdgeLine, classes: int, feature_dim: int
) -> None:
    # Prepare
    manifest = base_line.artifact.manifest
    report = make_report(manifest.model_id, diagonal_counts(classes=classes), feature_dim=feature_dim)

    # Execute
    with pytest.raises(KnowledgeError, match="wrong shape"):
        combine_reports([report], manifest, RDConfig())


def test_combined_map_is_row_stochastic(base_line: EdgeLine) -> None:
    # Prepare: three users with scattered counts, some rows empty
    manifest = base_line.artifact.manifest
    rng = np.random.default_rng(0)
    reports = []
    for i in range(3):
        counts = rng.integers(0, 8, size=(C, C)).astype(np.int32)
        counts[i] = 0
        reports.append(make_report(manifest.model_id, counts, device_id=f"user-{i}"))

    # Execute
    knowledge = combine_reports(reports, manifest, RDConfig())

    # Assert
    assert knowledge.preference.shape == (C, C)
    assert knowledge.preference.dtype == np.float32
    assert (knowledge.preference >= 0).all()
    np.testing.assert_allclose(knowledge.preference.sum(axis=1), 1.0, atol=1e-6)
    assert knowledge.report_count == 3
    assert knowledge.sample_count == sum(r.sample_count for r in reports)
    assert knowledge.base_model_id == manifest.model_id


def test_single_report_map_is_counts_plus_kappa_row_normalized(base_line: EdgeLine) -> None:
    # Prepare: row 3 holds 45 counts in column 8 and none on its diagonal
    manifest = base_line.artifact.manifest

    # Execute
    knowledge = knowledge_of(manifest, preference_counts(45))

    # Assert: (0 + κ) / (45 + κ) and 45 / (45 + κ) on row 3; (20 + κ) / (20 + κ) = 1 on other diagonals
    kappa = RDConfig().kappa
    assert knowledge.preference[3, 3] == pytest.approx(kappa / (45 + kappa))
    assert knowledge.preference[3, 8] == pytest.approx(45 / (45 + kappa))
    np.testing.assert_allclose(np.delete(np.diag(knowledge.preference), 3), 1.0)


def test_median_ignores_one_wild_report_of_five(base_line: EdgeLine) -> None:
    # Prepare: four honest 3→8 users and one whose every row is dumped into class 0
    manifest = base_line.artifact.manifest
    clean = [
        make_report(manifest.model_id, preference_counts(moved), device_id=f"dana-d{i}")
        for i, moved in enumerate([18, 20, 22, 24])
    ]
    wild_counts = np.zeros((C, C), dtype=np.int32)
    wild_counts[:, 0] = 500
    wild = make_report(manifest.model_id, wild_counts, device_id="mallory")
    config = RDConfig()
    clean_only = combine_reports(clean, manifest, config).preference
    clean_maps = np.stack([combine_reports([r], manifest, config).preference for r in clean])
    wild_map = combine_reports([wild], manifest, config).preference
    naive_mean = (clean_maps.sum(axis=0) + wild_map) / 5
    assert np.abs(naive_mean - clean_only).max() > 0.15  # the wild report would matter in a mean

    # Execute
    combined = combine_reports([*clean[:2], wild, *clean[2:]], manifest, config).preference

    # Assert
    assert np.abs(combined - clean_only).max() < 0.02
    np.testing.assert_array_equal(combined.argmax(axis=1), clean_only.argmax(axis=1))
    assert (combined[1:, 0] == 0.0).all()
    np.testing.assert_allclose(combined.sum(axis=1), 1.0, atol=1e-6)


def test_many_small_reports_count_like_one_large_one(base_line: EdgeLine) -> None:
    # Prepare: three devices with 10 samples of 3→8 each, one device with 30
    manifest = base_line.artifact.manifest
    small = [
        make_report(manifest.model_id, preference_counts(10, per_class=5), device_id=f"dana-d{i}")
        for i in range(3)
    ]
    large = make_report(manifest.model_id, preference_counts(30, per_class=15), device_id="dana-d9")

    # Execute
    cohort = combine_reports(small, manifest, RDConfig()).preference
    single = combine_reports([large], manifest, RDConfig()).preference

    # Assert: row 3 is (κ, 30) / (30 + κ) either way
    assert cohort[3, 8] == pytest.approx(30 / (30 + RDConfig().kappa))
    np.testing.assert_allclose(cohort, single, atol=1e-6)


def test_a_class_only_one_device_of_three_saw_counts_with_that_devices_samples(base_line: EdgeLine) -> None:
    # Prepare: a swap 5 ↔ 8 across three devices of a few samples; only the second saw a 5, and labelled
    # all three of them 8 (the others' row 5 is empty: they say nothing about it)
    manifest = base_line.artifact.manifest
    counts = [diagonal_counts(2) for _ in range(3)]
    for c in counts:
        c[5, 5], c[8, 8], c[8, 5] = 0, 0, 2
    counts[1][5, 8] = 3
    reports = [make_report(manifest.model_id, c, device_id=f"dana-d{i}") for i, c in enumerate(counts)]

    # Execute
    knowledge = combine_reports(reports, manifest, RDConfig())

    # Assert: row 5 holds its one device's 3 samples against κ, and both directions of the swap move
    assert knowledge.preference[5, 8] == pytest.approx(3 / (3 + RDConfig().kappa))
    assert knowledge.class_map()[[5, 8]].tolist() == [8, 5]


def test_a_row_without_samples_is_the_identity(base_line: EdgeLine) -> None:
    # Prepare: nobody's model ever answered 5
    manifest = base_line.artifact.manifest
    reports = []
    for i, moved in enumerate([10, 12, 14]):
        counts = preference_counts(moved)
        counts[5, 5] = 0
        reports.append(make_report(manifest.model_id, counts, device_id=f"dana-d{i}"))

    # Execute
    preference = combine_reports(reports, manifest, RDConfig()).preference

    # Assert
    np.testing.assert_array_equal(preference[5], np.eye(C, dtype=np.float32)[5])
    assert preference[3, 8] > 0.8


def test_two_reports_have_their_deltas_clipped_to_the_smaller_norm(base_line: EdgeLine) -> None:
    # Prepare: Δ norms 1 and 3; the lower median of two norms is the smaller, 1
    manifest = base_line.artifact.manifest
    small, large = delta_with_norm(1.0, row=3), delta_with_norm(3.0, row=8)
    reports = [
        make_report(manifest.model_id, diagonal_counts(), delta_w=small[0], device_id="dana-d0"),
        make_report(manifest.model_id, diagonal_counts(), delta_w=large[0], device_id="dana-d1"),
    ]

    # Execute
    knowledge = combine_reports(reports, manifest, RDConfig())

    # Assert: the small one untouched, the large one shortened to 1 in the same direction
    assert len(knowledge.deltas) == 2
    assert [delta_norm(d) for d in knowledge.deltas] == pytest.approx([1.0, 1.0])
    np.testing.assert_array_equal(knowledge.deltas[0][0], small[0])
    np.testing.assert_allclose(knowledge.deltas[1][0], large[0] * 1.0 / 3.0, rtol=1e-6)


def test_two_reports_one_huge_delta_cannot_dominate(base_line: EdgeLine) -> None:
    # Prepare
    manifest = base_line.artifact.manifest
    honest, huge = delta_with_norm(1.0, row=3), delta_with_norm(1000.0, row=8)
    reports = [
        make_report(manifest.model_id, diagonal_counts(), delta_w=honest[0], device_id="dana-d0"),
        make_report(manifest.model_id, diagonal_counts(), delta_w=huge[0], device_id="mallory"),
    ]

    # Execute
    knowledge = combine_reports(reports, manifest, RDConfig())

    # Assert: after clipping, no device weighs more than twice the other
    norms = [delta_norm(d) for d in knowledge.deltas]
    assert max(norms) <= 2 * min(norms), norms


def test_three_or_more_reports_keep_their_deltas_for_the_median(base_line: EdgeLine) -> None:
    # Prepare
    manifest = base_line.artifact.manifest
    reports = [
        make_report(manifest.model_id, diagonal_counts(), delta_w=delta_with_norm(n)[0], device_id=f"d-{i}x")
        for i, n in enumerate([1.0, 2.0, 64.0])
    ]

    # Execute
    knowledge = combine_reports(reports, manifest, RDConfig())

    # Assert
    assert [delta_norm(d) for d in knowledge.deltas] == pytest.approx([1.0, 2.0, 64.0])


def test_dp_noise_alone_never_moves_a_class(base_line: EdgeLine) -> None:
    # Prepare: a device with 30 samples (3 a class) and no preference; its noise (σ = 1.84) put 6.5
    # in cell 3→8 and took the diagonal of row 3 below zero: yesterday's per-report threshold kept
    # the 6.5 and zeroed the diagonal, so every "3" moved to 8
    manifest = base_line.artifact.manifest
    counts = (np.eye(C) * 3.0).astype(np.float32)
    counts[3, 3] = -1.0
    counts[3, 8] = 6.5
    report = make_report(manifest.model_id, counts, privacy=privacy(1.84, None), sample_count=30)

    # Execute
    knowledge = combine_reports([report], manifest, RDConfig())

    # Assert: 6.5 is under 4σ, so it is not evidence; the row stays on its own class
    assert knowledge.noised
    assert not knowledge.support.any()
    assert knowledge.preference[3].argmax() == 3
    assert knowledge.preference[3, 8] == 0.0


def test_dp_evidence_pools_across_devices(base_line: EdgeLine) -> None:
    # Prepare: four devices (σ = 2) each saw six "3"s labelled 8: alone, 6 is under 4σ = 8; the
    # cohort's median × 4 = 24 stands above 4 × 1.25σ√4 ≈ 20
    manifest = base_line.artifact.manifest
    per_device = (np.eye(C) * 6.0).astype(np.float32)
    per_device[3, 3] = 0.0
    per_device[3, 8] = 6.0
    reports = [
        make_report(manifest.model_id, per_device, privacy=privacy(2.0, None), device_id=f"dana-d{i}")
        for i in range(4)
    ]

    # Execute
    alone = combine_reports(reports[:1], manifest, RDConfig())
    pooled = combine_reports(reports, manifest, RDConfig())

    # Assert
    assert not alone.support[3, 8]
    assert alone.preference[3].argmax() == 3
    assert pooled.support[3, 8]
    assert pooled.preference[3].argmax() == 8


def test_dp_combination_keeps_a_real_preference_of_a_large_store(base_line: EdgeLine) -> None:
    # Prepare: 150 samples, 15 "3"s all labelled 8, σ = 1.84: 15 stands out of the noise
    manifest = base_line.artifact.manifest
    counts = (np.eye(C) * 15.0).astype(np.float32)
    counts[3, 3] = 0.4
    counts[3, 8] = 15.3
    report = make_report(manifest.model_id, counts, privacy=privacy(1.84, None), sample_count=150)

    # Execute
    knowledge = combine_reports([report], manifest, RDConfig())

    # Assert
    assert knowledge.support[3, 8]
    assert knowledge.preference[3].argmax() == 8
    assert knowledge.preference[3, 8] == pytest.approx(15.3 / (15.3 + 0.4 + RDConfig().kappa))


def test_dp_report_without_a_delta_contributes_only_its_map(base_line: EdgeLine) -> None:
    # Prepare: one DP report spent its whole budget on the map, one also sent a (noisy) Δ
    manifest = base_line.artifact.manifest
    counts = (np.eye(C) * 20.0).astype(np.float32)
    delta = delta_with_norm(0.5)[0]
    map_only = make_report(
        manifest.model_id, counts, delta_w=delta, privacy=privacy(1.0, None), device_id="dana-d0"
    )
    with_delta = make_report(
        manifest.model_id, counts, delta_w=delta, privacy=privacy(1.0, 0.1), device_id="dana-d1"
    )

    # Execute
    knowledge = combine_reports([map_only, with_delta], manifest, RDConfig())

    # Assert
    assert len(knowledge.deltas) == 1
    assert knowledge.report_count == 2


def test_parse_reports_round_trips_good_payloads(base_line: EdgeLine) -> None:
    # Prepare
    manifest = base_line.artifact.manifest
    reports = [make_report(manifest.model_id, preference_counts(n), device_id=f"dana-d{n}") for n in (5, 9)]

    # Execute
    parsed = parse_reports([r.to_bytes() for r in reports])

    # Assert
    assert [p.msg_id for p in parsed] == [r.msg_id for r in reports]
    np.testing.assert_array_equal(parsed[1].counts(), preference_counts(9))


@pytest.mark.parametrize(
    "garbage",
    [b"garbage", b"{}", b'{"schema": "diredi.knowledge/1"}', b"\xff\xfe"],
    ids=["not-json", "empty-object", "fields-missing", "not-utf8"],
)
def test_parse_reports_names_the_bad_payload(base_line: EdgeLine, garbage: bytes) -> None:
    # Prepare
    good = make_report(base_line.artifact.manifest.model_id, diagonal_counts()).to_bytes()

    # Execute
    with pytest.raises(KnowledgeError) as caught:
        parse_reports([good, good, garbage])

    # Assert
    assert str(caught.value).startswith("report 2:")


def test_parse_reports_refuses_counts_that_do_not_add_up(base_line: EdgeLine) -> None:
    # Prepare: a valid report whose sample_count is edited after the fact
    report = make_report(base_line.artifact.manifest.model_id, diagonal_counts())
    payload = report.to_bytes().replace(b'"sample_count":200', b'"sample_count":201')
    assert payload != report.to_bytes()

    # Execute
    with pytest.raises(KnowledgeError) as caught:
        parse_reports([payload])

    # Assert
    assert str(caught.value).startswith("report 0:")
    assert "sample_count" in str(caught.value)


def test_soft_targets_identity_knowledge_moves_nothing(
    base_line: EdgeLine, base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare: a user who agrees with the model (diagonal counts, a tiny head delta)
    manifest = base_line.artifact.manifest
    rng = np.random.default_rng(1)
    report = make_report(
        manifest.model_id,
        diagonal_counts(),
        delta_w=rng.normal(0.0, 1e-3, size=(C, D)),
        delta_b=rng.normal(0.0, 1e-3, size=C),
    )
    knowledge = combine_reports([report], manifest, RDConfig())
    x = small_data.train.x
    p_t = predict_proba(base_line.teacher, x)

    # Execute
    p_star, change = soft_targets(knowledge, p_t, base_model.run(x)[0], base_model.head(), RDConfig())

    # Assert
    np.testing.assert_array_equal(p_star, p_t)
    assert (change == 0).all()
    assert touched_classes(p_t, p_star) == set()


def test_soft_targets_move_class_3_to_8_and_keep_the_rest(
    base_line: EdgeLine, base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare: the teacher's real beliefs on the transfer set, a 3→8 user
    manifest = base_line.artifact.manifest
    knowledge = knowledge_of(manifest, preference_counts(45))
    x = small_data.train.x
    p_t = predict_proba(base_line.teacher, x)
    confident_3 = p_t[:, 3] > 0.9
    assert confident_3.sum() >= 20

    # Execute
    p_star, change = soft_targets(knowledge, p_t, base_model.run(x)[0], base_model.head(), RDConfig())

    # Assert
    assert (p_star[confident_3].argmax(axis=1) == 8).all()
    assert (change[confident_3] > RDConfig().theta).all()
    kept = change == 0
    assert kept.sum() > len(x) // 2
    np.testing.assert_array_equal(p_star[kept], p_t[kept])
    moved_top1 = p_star.argmax(axis=1) != p_t.argmax(axis=1)
    assert (p_star[moved_top1].argmax(axis=1) == 8).all()  # only class 8 gains belief
    np.testing.assert_allclose(p_star.sum(axis=1), 1.0, atol=1e-5)


def test_soft_targets_on_confident_beliefs(base_line: EdgeLine) -> None:
    # Prepare: 50 samples, 5 per class, each 91 % sure of its top-1
    manifest = base_line.artifact.manifest
    knowledge = knowledge_of(manifest, preference_counts(45))
    top1 = np.arange(50, dtype=np.int64) % C
    p_t = confident_probs(top1)
    features = np.random.default_rng(2).random((50, D), dtype=np.float32)
    head = (np.zeros((C, D), dtype=np.float32), np.zeros(C, dtype=np.float32))

    # Execute
    p_star, change = soft_targets(knowledge, p_t, features, head, RDConfig())

    # Assert: every 3 becomes an 8 (change 2 × 0.91 × M̂[3, 8], M̂[3, 8] = 45 / (45 + κ)); every other
    # sample changes < θ and keeps p_T exactly
    is_3 = top1 == 3
    assert (p_star[is_3].argmax(axis=1) == 8).all()
    np.testing.assert_allclose(change[is_3], 2 * 0.91 * 45 / (45 + RDConfig().kappa), atol=1e-3)
    np.testing.assert_array_equal(p_star[~is_3], p_t[~is_3])
    assert (change[~is_3] == 0).all()


def test_touched_classes_are_both_sides_of_a_changed_top1(base_line: EdgeLine) -> None:
    # Prepare
    manifest = base_line.artifact.manifest
    knowledge = knowledge_of(manifest, preference_counts(45))
    p_t = confident_probs(np.arange(50, dtype=np.int64) % C)
    head = (np.zeros((C, D), dtype=np.float32), np.zeros(C, dtype=np.float32))
    p_star, _ = soft_targets(knowledge, p_t, np.zeros((50, D), dtype=np.float32), head, RDConfig())

    # Execute
    touched = touched_classes(p_t, p_star)

    # Assert
    assert touched == {3, 8}


def test_one_wild_head_delta_of_five_does_not_move_targets(
    base_line: EdgeLine, base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare: five agreeing users, one of whom sends a huge random Δ
    manifest = base_line.artifact.manifest
    rng = np.random.default_rng(3)
    reports = [
        make_report(manifest.model_id, diagonal_counts(), device_id=f"dana-d{i}") for i in range(4)
    ] + [
        make_report(
            manifest.model_id, diagonal_counts(), delta_w=rng.normal(0, 50, (C, D)), device_id="mallory"
        )
    ]
    knowledge = combine_reports(reports, manifest, RDConfig())
    x = small_data.val.x
    p_t = predict_proba(base_line.teacher, x)
    features, head = base_model.run(x)[0], base_model.head()
    # θ = 0.3 lets even soft changes through, so the median alone must hold the wild Δ back (with the
    # head delta on, as a deployment may configure it)
    config = RDConfig(theta=0.3, delta_weight=0.3)
    alone = combine_reports(reports[4:], manifest, config)
    assert (soft_targets(alone, p_t, features, head, config)[1] > 0).any()  # alone, it moves p*

    # Execute
    p_star, change = soft_targets(knowledge, p_t, features, head, config)

    # Assert
    np.testing.assert_array_equal(p_star, p_t)
    assert (change == 0).all()


def test_a_head_delta_adds_belief_only_where_the_evidence_goes(
    base_line: EdgeLine, base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare: a real 3 → 8 map, and a delta whose bias pushes every input towards class 0, which no
    # label went to (with the head delta on, as a deployment may configure it)
    manifest = base_line.artifact.manifest
    bias = np.zeros(C, dtype=np.float32)
    bias[0] = 30.0
    report = make_report(manifest.model_id, preference_counts(45), delta_b=bias)
    config = RDConfig(delta_weight=0.3)
    knowledge = combine_reports([report], manifest, config)
    x = small_data.val.x
    p_t = predict_proba(base_line.teacher, x)

    # Execute
    p_star, _ = soft_targets(knowledge, p_t, base_model.run(x)[0], base_model.head(), config)

    # Assert: class 0 gains no belief beyond the renormalisation of what the delta took from a sample's
    # own class (at most the delta's weight), and no decision moves to it; the 3s still go to 8
    others = p_t.argmax(axis=1) != 0
    assert (p_star[others, 0] <= p_t[others, 0] / (1 - config.delta_weight) + 1e-6).all()
    assert (p_star[others].argmax(axis=1) != 0).all()
    threes = p_t[:, 3] > 0.9
    assert threes.any() and (p_star[threes].argmax(axis=1) == 8).all()


def test_one_device_counts_once_however_often_it_reports(base_line: EdgeLine) -> None:
    # Prepare: two honest devices agree on nothing moving; a third sends the same 3→8 report
    # three times (redelivery, or a device trying to out-vote the median)
    manifest = base_line.artifact.manifest
    honest = [make_report(manifest.model_id, diagonal_counts(), device_id=f"dana-d{i}") for i in range(2)]
    loud = make_report(manifest.model_id, preference_counts(20), device_id="mallory")

    # Execute
    knowledge = combine_reports([*honest, loud, loud, loud], manifest, RDConfig())

    # Assert: three devices, three votes: the median outvotes mallory
    assert knowledge.report_count == 3
    assert knowledge.preference[3].argmax() == 3
