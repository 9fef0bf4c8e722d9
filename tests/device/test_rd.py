"""device_firmware_py.rd: preference map, head delta and the knowledge report, on the real int8 model."""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pytest

from device_firmware_py.exceptions import InvalidSamplesError, NotEnoughSamplesError
from device_firmware_py.privacy import DPConfig
from device_firmware_py.rd import RDPolicy, extract_knowledge, fit_head_delta, preference_map
from device_firmware_py.runtime import FloatArray, Int8Model, softmax
from wire import KnowledgeReport

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData, Split
    from cloud.ml.line import EdgeLine

IntArray = npt.NDArray[np.int64]


def cross_entropy(features: FloatArray, labels: IntArray, w: FloatArray, b: FloatArray) -> float:
    probs = softmax(features @ w.T + b)
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + 1e-12)))


def separable_problem(
    n: int = 300, classes: int = 3, dim: int = 8
) -> tuple[FloatArray, IntArray, FloatArray, FloatArray]:
    """Well-separated non-negative clusters, and a head that confuses class 0 with class 1."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, classes, size=n)
    centres = np.eye(classes, dim, dtype=np.float32) * 4.0
    features = np.abs(centres[labels] + rng.normal(0.0, 0.3, size=(n, dim))).astype(np.float32)
    w = np.eye(classes, dim, dtype=np.float32)
    w[[0, 1]] = w[[1, 0]]  # the head's class 0 row looks for class 1's cluster and vice versa
    b = np.zeros(classes, dtype=np.float32)
    return features, labels, w, b


def dana_pool(data: ScenarioData) -> Split:
    """The private pool of user 'dana' (who labels 3 as 8) on her first device."""
    user = data.users[0]
    assert user.spec.id == "dana"
    return user.device_train[0]


def found_in(needles: list[bytes], haystacks: list[bytes]) -> list[bytes]:
    """The needles that occur in any haystack."""
    return [n for n in needles if any(n in h for h in haystacks)]


def test_preference_map_counts_every_pair_including_repeats() -> None:
    # Prepare
    predicted = np.array([0, 1, 1, 2, 2, 2, 0])
    labels = np.array([0, 1, 2, 2, 2, 2, 1])

    # Execute
    counts = preference_map(predicted, labels, num_classes=4)

    # Assert
    expected = np.zeros((4, 4), dtype=np.int32)
    expected[0, 0] = 1
    expected[1, 1] = 1
    expected[1, 2] = 1
    expected[2, 2] = 3
    expected[0, 1] = 1
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts, expected)


def test_preference_map_rows_are_predictions_and_columns_are_labels() -> None:
    # Prepare
    predicted = np.array([3, 3, 3])
    labels = np.array([8, 8, 3])

    # Execute
    counts = preference_map(predicted, labels, num_classes=10)

    # Assert
    assert counts[3, 8] == 2
    assert counts[8, 3] == 0
    assert counts[3, 3] == 1
    assert counts.sum() == 3


def test_fit_head_delta_lowers_cross_entropy_and_fixes_the_head() -> None:
    # Prepare
    features, labels, w, b = separable_problem()
    w_before, b_before = w.copy(), b.copy()

    # Execute
    dw, db = fit_head_delta(features, labels, w, b, RDPolicy())

    # Assert
    assert dw.shape == w.shape and db.shape == b.shape
    assert dw.dtype == db.dtype == np.float32
    assert cross_entropy(features, labels, w + dw, b + db) < 0.5 * cross_entropy(features, labels, w, b)
    assert np.mean(np.argmax(features @ (w + dw).T + b + db, axis=1) == labels) > 0.98
    np.testing.assert_array_equal(w, w_before)  # the base head is not modified in place
    np.testing.assert_array_equal(b, b_before)


def test_fit_head_delta_with_a_stronger_l2_stays_smaller() -> None:
    # Prepare
    features, labels, w, b = separable_problem()

    # Execute
    weak = fit_head_delta(features, labels, w, b, RDPolicy(l2=1e-3))
    strong = fit_head_delta(features, labels, w, b, RDPolicy(l2=1.0))

    # Assert
    assert np.linalg.norm(strong[0]) < np.linalg.norm(weak[0])


def test_fit_head_delta_with_no_steps_is_zero() -> None:
    # Prepare
    features, labels, w, b = separable_problem()

    # Execute
    dw, db = fit_head_delta(features, labels, w, b, RDPolicy(steps=0))

    # Assert
    assert not dw.any() and not db.any()


def test_fit_head_delta_learns_the_classes_the_outputs_stand_for() -> None:
    # Prepare: the head confuses classes 0 and 1; under a map swapping its outputs 0 and 1 it is right,
    # as is the head with those rows swapped under the identity
    features, labels, w, b = separable_problem()
    swapped = np.array([1, 0, 2])
    w_right, b_right = w[[1, 0, 2]], b[[1, 0, 2]]

    # Execute
    mapped = fit_head_delta(features, labels, w, b, RDPolicy(), swapped)
    right = fit_head_delta(features, labels, w_right, b_right, RDPolicy())

    # Assert: the same fit, its rows where the outputs are
    np.testing.assert_allclose(mapped[0], right[0][[1, 0, 2]], atol=1e-5)
    np.testing.assert_allclose(mapped[1], right[1][[1, 0, 2]], atol=1e-5)
    decided = swapped[np.argmax(features @ (w + mapped[0]).T + b + mapped[1], axis=1)]
    assert np.mean(decided == labels) > 0.98


def test_labels_no_output_stands_for_teach_the_head_nothing() -> None:
    # Prepare: outputs 0 and 1 both stand for class 0, so nothing can say class 1
    features, labels, w, b = separable_problem()
    merged = np.array([0, 0, 2])
    ones = labels == 1

    # Execute
    dw, db = fit_head_delta(features[ones], labels[ones], w, b, RDPolicy(), merged)

    # Assert
    assert not dw.any() and not db.any()


def test_the_preference_map_counts_the_classes_the_outputs_stand_for(
    base_line: EdgeLine, small_data: ScenarioData
) -> None:
    # Prepare: dana labels 3 as 8; her model already merges output 3 into class 8
    pool = dana_pool(small_data)
    manifest = base_line.artifact.manifest.model_copy(
        update={"output_classes": [0, 1, 2, 8, 4, 5, 6, 7, 8, 9]}
    )
    merged = Int8Model(base_line.artifact.model, manifest)

    # Execute
    report = extract_knowledge(merged, pool.x, pool.y, device_id="dev-1")

    # Assert: no decision is a 3 any more, and the 3s she labels 8 are agreements, not a preference
    counts = report.counts()
    assert not counts[3].any()
    assert counts[8, 8] >= (pool.y == 8).sum() * 0.9
    assert report.metrics is not None and report.metrics.holdout_acc_before > 0.9


def test_extract_knowledge_reports_dana_preference(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    pool = dana_pool(small_data)

    # Execute
    report = extract_knowledge(base_model, pool.x, pool.y, device_id="dev-1")

    # Assert
    counts = report.counts()
    assert report.device_id == "dev-1"
    assert report.base_model_id == base_model.manifest.model_id
    assert report.sample_count == len(pool) == 100
    assert counts.sum() == len(pool)
    assert report.preference_map.dtype == "int32"
    assert report.privacy is None
    assert (report.num_classes, report.feature_dim) == (10, 64)
    assert counts[3].sum() >= 5
    assert counts[3, 8] > 0.5 * counts[3].sum()  # what the model calls 3, dana calls 8
    assert report.metrics is not None
    assert report.metrics.holdout_size == 20


def test_extract_knowledge_report_survives_the_wire(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    pool = dana_pool(small_data)
    report = extract_knowledge(base_model, pool.x, pool.y, device_id="dev-1")

    # Execute
    parsed = KnowledgeReport.from_bytes(report.to_bytes())

    # Assert
    assert parsed == report


def test_extract_knowledge_head_delta_helps_on_dana_data(
    base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare
    pool = dana_pool(small_data)
    w, b = base_model.head()
    features, _ = base_model.run(pool.x)

    # Execute
    report = extract_knowledge(base_model, pool.x, pool.y, device_id="dev-1")
    dw, db = report.head_delta()

    # Assert
    assert np.linalg.norm(dw) > 0
    assert cross_entropy(features, pool.y, w + dw, b + db) < cross_entropy(features, pool.y, w, b)


def test_extract_knowledge_is_deterministic_for_a_seed(
    base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare
    pool = dana_pool(small_data)

    # Execute
    first = extract_knowledge(base_model, pool.x, pool.y, device_id="dev-1", seed=5)
    second = extract_knowledge(base_model, pool.x, pool.y, device_id="dev-1", seed=5)

    # Assert
    fields = {"msg_id", "sent_at"}
    assert first.model_dump(exclude=fields) == second.model_dump(exclude=fields)


def test_below_min_samples_is_refused(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    pool = dana_pool(small_data)

    # Execute / Assert
    assert RDPolicy().min_samples == 20
    with pytest.raises(NotEnoughSamplesError, match="19"):
        extract_knowledge(base_model, pool.x[:19], pool.y[:19], device_id="dev-1")


def test_exactly_min_samples_is_enough(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    pool = dana_pool(small_data)

    # Execute
    report = extract_knowledge(base_model, pool.x[:20], pool.y[:20], device_id="dev-1")

    # Assert
    assert report.sample_count == 20
    assert report.counts().sum() == 20


def test_custom_min_samples_is_honoured(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    pool = dana_pool(small_data)

    # Execute / Assert
    with pytest.raises(NotEnoughSamplesError):
        extract_knowledge(
            base_model, pool.x[:40], pool.y[:40], device_id="dev-1", policy=RDPolicy(min_samples=41)
        )


@pytest.mark.parametrize("bad_label", [-1, 10, 1000])
def test_labels_out_of_range_are_refused(
    base_model: Int8Model, small_data: ScenarioData, bad_label: int
) -> None:
    # Prepare
    pool = dana_pool(small_data)
    labels = pool.y[:30].copy()
    labels[7] = bad_label

    # Execute / Assert
    with pytest.raises(ValueError, match="labels"):
        extract_knowledge(base_model, pool.x[:30], labels, device_id="dev-1")


def test_report_contains_no_private_row_nor_its_features(
    base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare
    pool = dana_pool(small_data)
    features, _ = base_model.run(pool.x)
    int8_features, _ = base_model.run_int8(pool.x)
    rows: list[npt.NDArray[np.generic]] = [*pool.x, *features]
    needles = [row.astype(dtype).tobytes() for row in rows for dtype in (np.float32, np.float16)]
    needles += [row.tobytes() for row in int8_features]
    # The search itself finds a row that is there (the test is not blind).
    assert found_in(needles, [pool.x[5:6].astype(np.float16).tobytes()])

    # Execute
    report = extract_knowledge(base_model, pool.x, pool.y, device_id="dev-1")
    payload = report.to_bytes()
    doc = json.loads(payload)
    decoded = [
        base64.b64decode(doc[name]["data"]) for name in ("preference_map", "delta_weight", "delta_bias")
    ]

    # Assert
    assert found_in(needles, [payload, *decoded]) == []
    assert found_in([base64.b64encode(n) for n in needles], [payload]) == []
    assert set(doc) == {
        "schema",
        "msg_id",
        "device_id",
        "sent_at",
        "base_model_id",
        "num_classes",
        "feature_dim",
        "sample_count",
        "preference_map",
        "delta_weight",
        "delta_bias",
        "metrics",
        "privacy",
    }


def test_dp_noise_cannot_be_regenerated_from_the_seed(
    base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare
    pool = dana_pool(small_data)
    dp = DPConfig(epsilon=4.0)

    # Execute: the same seed twice, noise from the OS
    first = extract_knowledge(base_model, pool.x, pool.y, device_id="dana-d0", dp=dp, seed=1)
    second = extract_knowledge(base_model, pool.x, pool.y, device_id="dana-d0", dp=dp, seed=1)

    # Assert: different noise, and no unnoised metrics in a DP report
    assert not np.array_equal(first.counts(), second.counts())
    assert first.metrics is None and second.metrics is None


def test_seeded_dp_noise_repeats_for_the_simulation(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    pool = dana_pool(small_data)
    dp = DPConfig(epsilon=4.0)

    # Execute
    reports = [
        extract_knowledge(
            base_model, pool.x, pool.y, device_id="dana-d0", dp=dp, noise_rng=np.random.default_rng(9)
        )
        for _ in range(2)
    ]

    # Assert
    np.testing.assert_array_equal(reports[0].counts(), reports[1].counts())


@pytest.mark.parametrize("bad", ["fewer-inputs", "float-labels", "2d-labels"])
def test_samples_that_do_not_fit_are_refused(
    bad: str, base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare
    pool = dana_pool(small_data)
    x, y = pool.x, np.asarray(pool.y)
    y_bad: npt.NDArray[np.generic] = y
    if bad == "fewer-inputs":
        x = x[:-1]
    elif bad == "float-labels":
        y_bad = y.astype(np.float64) + 0.5
    else:
        y_bad = np.stack([y, y], axis=1)

    # Execute / Assert
    with pytest.raises(InvalidSamplesError):
        extract_knowledge(base_model, x, y_bad, device_id="dana-d0")  # type: ignore[arg-type]


def test_inputs_of_the_wrong_width_are_refused(base_model: Int8Model) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        base_model.run(np.zeros((3, 65), dtype=np.float32))
