"""Generated scenario suites: many users with the preferences, noise and pool sizes fleets meet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud.ml.scenario import Scenario

KINDS = ("merge", "swap", "cycle", "mix", "none")


@dataclass(frozen=True)
class BuiltInData:
    """What the generator needs to know of a built-in dataset (not loaded here, to stay light)."""

    classes: int
    samples: int
    max_noise: float  # in the data's own units: an eighth of its value range


DATASETS = {"digits": BuiltInData(10, 1797, 2.0), "mnist-5k": BuiltInData(10, 5000, 32.0)}
DIGITS_CLASSES = DATASETS["digits"].classes
DIGITS_SAMPLES = DATASETS["digits"].samples
MAX_USERS = 4
MAX_DEVICES = 5
MIN_PRIVATE_TRAIN = 20  # the device's default min_samples: every device of a generated user reports
MAX_PRIVATE_TRAIN = 150
MIN_PRIVATE_TEST = 60
# A manufacturer's presumed data outweighs its users' private data: generated users take at most
# this share of the dataset, so the cloud keeps a real transfer set (digits has only 1,797 samples;
# at a quarter presumed, the transfer set fell to ~250 samples, 25 a class, for four relabelled classes).
PRIVATE_SHARE = 0.45
NO_PREFERENCE_SHARE = 0.2


def preference_kind(label_map: dict[int, int]) -> str:
    """Classify a label_map as "none", "merge", "swap", "cycle" or "mix".

    The map relabels class c as f(c) (c itself when absent). No class moved: "none". f a permutation:
    "swap" if it only exchanges pairs, else "cycle". Otherwise some class is lost (several classes
    share a label): "merge" if nothing is exchanged, "mix" if some classes also form a cycle.
    """
    moved = {src: dst for src, dst in label_map.items() if src != dst}
    if not moved:
        return "none"
    on_cycles: list[int] = []  # the length of every cycle of f through the moved classes
    seen: set[int] = set()
    for start in moved:
        path: list[int] = []
        node = start
        while node in moved and node not in seen and node not in path:
            path.append(node)
            node = moved[node]
        if node in path:  # the walk closed a cycle that begins at `node`
            on_cycles.append(len(path) - path.index(node))
        seen.update(path)
    cycled = sum(on_cycles)
    if cycled == len(moved):  # every moved class lies on a cycle: f is a permutation
        return "swap" if all(length == 2 for length in on_cycles) else "cycle"
    return "mix" if on_cycles else "merge"


def _label_map(kind: str, rng: np.random.Generator) -> dict[str, int]:
    """A label_map of the given kind over the digits' classes, keys as the scenario file spells them."""
    classes = [int(c) for c in rng.permutation(DIGITS_CLASSES)]
    mapping: dict[int, int] = {}
    if kind == "merge":
        sources = classes[: int(rng.integers(1, 4))]
        targets = classes[len(sources) :]  # never a source: a merge, not a chain or an exchange
        mapping = {src: targets[int(rng.integers(len(targets)))] for src in sources}
    elif kind == "swap":
        a, b = classes[:2]
        mapping = {a: b, b: a}
    elif kind == "cycle":
        a, b, c = classes[:3]
        mapping = {a: b, b: c, c: a}
    elif kind == "mix":
        # a swap or a 3-cycle, plus one class merged into any other class
        length = int(rng.integers(2, 4))
        ring, merged = classes[:length], classes[length]
        mapping = {ring[k]: ring[(k + 1) % length] for k in range(length)}
        others = [c for c in classes if c != merged]
        mapping[merged] = others[int(rng.integers(len(others)))]
    return {str(src): dst for src, dst in mapping.items()}


def _fit_pools(users: list[dict[str, Any]], samples: int) -> None:
    """Shrink private pools until they take at most PRIVATE_SHARE of the dataset's `samples`: training
    pools, largest first, down to MIN_PRIVATE_TRAIN, then test pools, largest first, down to
    MIN_PRIVATE_TEST."""
    budget = int(samples * PRIVATE_SHARE)

    def over() -> int:
        return int(sum(u["devices"] * u["private_train"] + u["private_test"] for u in users)) - budget

    while (excess := over()) > 0:
        user = max(users, key=lambda u: u["devices"] * u["private_train"])
        cut = min(-(-excess // user["devices"]), user["private_train"] - MIN_PRIVATE_TRAIN)
        if cut <= 0:
            break
        user["private_train"] -= cut
    while (excess := over()) > 0:
        user = max(users, key=lambda u: u["private_test"])
        cut = min(excess, user["private_test"] - MIN_PRIVATE_TEST)
        if cut <= 0:  # cannot happen with these bounds (at most 4 × (5 × 20 + 60) = 640 samples)
            raise AssertionError("private pools cannot be shrunk to fit the dataset")
        user["private_test"] -= cut


def generate_scenario(seed: int, index: int, dataset: str = "digits") -> Scenario:
    """Scenario `index` of the suite `seed` on a built-in `dataset`, drawn from its own generator seeded
    by (seed, index) (the same draws on every dataset; noise scales with the data's value range)."""
    data = DATASETS[dataset]
    rng = np.random.default_rng([seed, index])
    users: list[dict[str, Any]] = []
    for j in range(int(rng.integers(1, MAX_USERS + 1))):
        kind = "none" if rng.random() < NO_PREFERENCE_SHARE else KINDS[int(rng.integers(4))]
        users.append(
            {
                "id": f"u{j:02d}-{kind}",
                "label_map": _label_map(kind, rng),
                "noise_std": round(float(rng.uniform(0.0, 2.0)) * data.max_noise / 2.0, 1),
                "devices": int(rng.integers(1, MAX_DEVICES + 1)),
                "private_train": int(rng.integers(MIN_PRIVATE_TRAIN, MAX_PRIVATE_TRAIN + 1)),
                "private_test": int(rng.integers(100, 151)),
            }
        )
    _fit_pools(users, data.samples)
    prefix = "gen" if dataset == "digits" else f"gen-{dataset}"
    scenario = Scenario.model_validate(
        {
            "name": f"{prefix}-s{seed}-{index}",
            "dataset": dataset,
            "seed": int(rng.integers(0, 2**32)),
            "presumed": {
                "test_fraction": round(float(rng.uniform(0.15, 0.3)), 2),
                "val_fraction": round(float(rng.uniform(0.15, 0.25)), 2),
            },
            "users": users,
        }
    )
    scenario.check_against(data.classes, data.samples)
    return scenario


def generate_scenarios(count: int, seed: int, dataset: str = "digits") -> list[Scenario]:
    """`count` scenarios of the suite `seed` on `dataset`; scenario i depends only on (seed, i)."""
    if count < 0 or seed < 0:
        raise ValueError(f"count and seed must not be negative, got count={count}, seed={seed}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; built in: {', '.join(DATASETS)}")
    return [generate_scenario(seed, i, dataset) for i in range(count)]
