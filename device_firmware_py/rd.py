"""Reverse distillation on the device: extract the user's difference from private labelled samples.

The knowledge has two parts (DESIGN §3 step 4): the preference map (the model's top-1 against the
user's label, counted) and the head delta Δ, the float head fine-tuned in numpy on the int8 features.
Only these aggregates leave the device, never a sample or its features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from device_firmware_py.exceptions import InvalidSamplesError, NotEnoughSamplesError
from device_firmware_py.privacy import DPConfig, PrivacyAccountant, privatize
from device_firmware_py.runtime import FloatArray, Int8Model, softmax
from wire import EncodedArray, KnowledgeMetrics, KnowledgeReport, PrivacyStatement

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RDPolicy:
    """How the device fits Δ and when it may report."""

    min_samples: int = 20
    l2: float = 1e-2  # weight of ½‖Δ‖² in the head fine-tuning loss
    steps: int = 300
    learning_rate: float = 0.05
    holdout_fraction: float = 0.2


def preference_map(predicted: IntArray, labels: IntArray, num_classes: int) -> npt.NDArray[np.int32]:
    """C×C counts: row = the model's top-1, column = the user's label."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int32)
    np.add.at(counts, (predicted, labels), 1)
    return counts


def fit_head_delta(
    features: FloatArray,
    labels: IntArray,
    w: FloatArray,
    b: FloatArray,
    policy: RDPolicy,
    class_of_output: IntArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Δ minimising CE((W+ΔW)f + b+Δb, y) + l2·½‖Δ‖², by full-batch Adam from Δ = 0.

    With `class_of_output` (the manifest's output map) the CE is on the classes: a label's
    probability is the sum of its outputs' softmax, and each of those outputs shares its gradient.
    """
    n = len(labels)
    classes = np.arange(w.shape[0]) if class_of_output is None else class_of_output
    owns = (classes[None, :] == labels[:, None]).astype(np.float32)  # N×C: output k stands for y_n
    outputs = owns.sum(axis=1, keepdims=True)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, policy.steps + 1):
        probs = softmax(features @ (w + dw).T + (b + db))
        # d(−log Σ_{k∈y} p_k)/dz = p − share, share = p·[k∈y]/Σ_{k∈y} p_k (the identity map: onehot(y));
        # where the label's outputs underflow to 0 they share evenly, and a label no output stands for
        # (a class the map merged away) has no gradient: the head cannot learn it, the map reports it
        mine = probs * owns
        total = mine.sum(axis=1, keepdims=True)
        share = np.where(total > 0, mine / np.maximum(total, 1e-30), owns / np.maximum(outputs, 1.0))
        share = np.where(outputs > 0, share, probs)
        err = (probs - share) / n
        grads = (err.T @ features + policy.l2 * dw, err.sum(axis=0) + policy.l2 * db)
        for i, (param, grad) in enumerate(zip((dw, db), grads, strict=True)):
            m[i] = beta1 * m[i] + (1 - beta1) * grad
            v[i] = beta2 * v[i] + (1 - beta2) * grad * grad
            step = policy.learning_rate * (m[i] / (1 - beta1**t)) / (np.sqrt(v[i] / (1 - beta2**t)) + eps)
            param -= step.astype(np.float32)
    return dw, db


def _accuracy(
    features: FloatArray, labels: IntArray, w: FloatArray, b: FloatArray, class_of_output: IntArray
) -> float:
    decided = class_of_output[np.argmax(features @ w.T + b, axis=1)]
    return float(np.mean(decided == labels)) if len(labels) else 0.0


def extract_knowledge(
    model: Int8Model,
    inputs: FloatArray,
    labels: IntArray,
    *,
    device_id: str,
    policy: RDPolicy | None = None,
    dp: DPConfig | None = None,
    accountant: PrivacyAccountant | None = None,
    seed: int = 0,
    noise_rng: np.random.Generator | None = None,
) -> KnowledgeReport:
    """Run the int8 model on the private samples and return the knowledge report to publish.

    `seed` only picks the local hold-out. DP noise comes from `noise_rng`, by default a generator
    seeded by the operating system: noise anyone could regenerate would protect nothing (only the
    simulation passes a seeded one, to make its runs repeatable).

    Raises NotEnoughSamplesError below `min_samples`, InvalidSamplesError for inputs and labels that
    do not fit the model, PrivacyBudgetExhaustedError when DP is on and the accountant's budget
    would be exceeded (nothing is spent then).
    """
    policy = policy or RDPolicy()
    labels = np.asarray(labels)
    n = len(labels)
    if n < policy.min_samples:
        raise NotEnoughSamplesError(f"{n} labelled samples, RD needs at least {policy.min_samples}")
    manifest = model.manifest
    c = manifest.num_classes
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= c:
        raise InvalidSamplesError(f"labels must be a 1-D array of integers in [0, {c})")
    labels = labels.astype(np.int64)
    if len(inputs) != n:
        raise InvalidSamplesError(f"{len(inputs)} inputs for {n} labels")
    if dp is not None and accountant is not None and accountant.delta != dp.delta:
        raise ValueError(f"the accountant tracks δ={accountant.delta}, the report would use δ={dp.delta}")
    features, logits = model.run(inputs)
    classes = manifest.class_of_output()
    counts = preference_map(model.decide(logits), labels, c)
    w, b = model.head()

    metrics = None
    if dp is None:  # hold-out metrics from a fit on the rest; unnoised, so never sent under DP
        order = np.random.default_rng(seed).permutation(n)
        n_hold = int(round(n * policy.holdout_fraction))
        hold, train = order[:n_hold], order[n_hold:]
        dw, db = fit_head_delta(features[train], labels[train], w, b, policy, classes)
        metrics = KnowledgeMetrics(
            holdout_size=n_hold,
            holdout_acc_before=_accuracy(features[hold], labels[hold], w, b, classes),
            holdout_acc_after=_accuracy(features[hold], labels[hold], w + dw, b + db, classes),
        )
    dw, db = fit_head_delta(features, labels, w, b, policy, classes)

    privacy = None
    map_out: npt.NDArray[np.float32] | npt.NDArray[np.int32] = counts
    if dp is not None:
        spent = accountant.charge(dp.rho) if accountant is not None else None
        rng = noise_rng if noise_rng is not None else np.random.default_rng()
        map_out, dw, db = privatize(counts.astype(np.float64), dw, db, dp, rng)
        privacy = PrivacyStatement(
            epsilon=dp.epsilon,
            delta=dp.delta,
            rho=dp.rho,
            sigma_map=dp.sigma_map,
            sigma_delta=None if dp.map_share >= 1 else dp.sigma_delta,
            clip_norm=dp.clip_norm,
            spent_epsilon=spent if spent is not None else dp.epsilon,
        )
    return KnowledgeReport(
        device_id=device_id,
        base_model_id=manifest.model_id,
        num_classes=c,
        feature_dim=manifest.feature_dim,
        sample_count=n,
        preference_map=EncodedArray.from_numpy(map_out, "int32" if dp is None else "float32"),
        delta_weight=EncodedArray.from_numpy(dw, "float16"),
        delta_bias=EncodedArray.from_numpy(db, "float16"),
        metrics=metrics,
        privacy=privacy,
    )
