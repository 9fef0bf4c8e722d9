"""Datasets and the disjoint pools of a scenario: presumed train/val/test and each user's private data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cloud.ml.datasources import Dataset, load_dataset
from cloud.ml.scenario import Scenario, UserSpec

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    """Model-ready inputs (scaled) and labels."""

    x: FloatArray
    y: IntArray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class UserData:
    """One user's private pools (already in their scenario: their labels, their noise) and test view."""

    spec: UserSpec
    device_train: list[Split]  # one private training pool per device
    private_test: Split
    world_test: Split  # private test + presumed test transformed into the user's scenario


@dataclass(frozen=True)
class ScenarioData:
    """Every pool of one scenario, disjoint and deterministic for its seed."""

    num_classes: int
    input_scale: float
    input_shape: tuple[int, ...]
    pixel_scale: float | None  # set when samples are images a device may decode from files
    train: Split  # presumed training data: also the cloud's transfer set
    val: Split  # presumed validation split: the gate's data, neither transfer nor test
    test: Split
    users: list[UserData]


def to_user_scenario(split: Split, user: UserSpec, scale: float, rng: np.random.Generator) -> Split:
    """Transform samples into a user's world: their label_map on labels, their noise on inputs.

    `noise_std` is in the dataset's own units; model inputs are raw / `scale`, so the noise is too.
    """
    mapped = split.y.copy()
    for src, dst in user.label_map.items():
        mapped[split.y == src] = dst
    x = split.x
    if user.noise_std:
        x = (x + rng.normal(0.0, user.noise_std / scale, size=x.shape)).astype(np.float32)
    return Split(x=x, y=mapped)


def build_scenario_data(scenario: Scenario, dataset: Dataset | None = None) -> ScenarioData:
    """Cut the dataset into the scenario's disjoint pools."""
    ds = dataset or load_dataset(scenario.dataset)
    scenario.check_against(ds.num_classes, len(ds.labels))
    rng = np.random.default_rng(scenario.seed)
    order = rng.permutation(len(ds.labels))
    cursor = 0

    def take(n: int) -> IntArray:
        nonlocal cursor
        idx = order[cursor : cursor + n]
        cursor += n
        return idx

    private_idx = [
        ([take(u.private_train) for _ in range(u.devices)], take(u.private_test)) for u in scenario.users
    ]
    presumed = order[cursor:]
    n_test = int(round(len(presumed) * scenario.presumed.test_fraction))
    n_val = int(round(len(presumed) * scenario.presumed.val_fraction))
    test_idx, val_idx, train_idx = (
        presumed[:n_test],
        presumed[n_test : n_test + n_val],
        presumed[n_test + n_val :],
    )

    def pool(idx: IntArray) -> Split:
        return Split(x=(ds.inputs[idx] / ds.input_scale).astype(np.float32), y=ds.labels[idx])

    test = pool(test_idx)
    users: list[UserData] = []
    for user, (device_idx, ptest_idx) in zip(scenario.users, private_idx, strict=True):
        user_rng = np.random.default_rng([scenario.seed, len(users)])
        devices = [to_user_scenario(pool(i), user, ds.input_scale, user_rng) for i in device_idx]
        ptest = to_user_scenario(pool(ptest_idx), user, ds.input_scale, user_rng)
        test_view = to_user_scenario(test, user, ds.input_scale, user_rng)
        world = Split(x=np.concatenate([ptest.x, test_view.x]), y=np.concatenate([ptest.y, test_view.y]))
        users.append(UserData(spec=user, device_train=devices, private_test=ptest, world_test=world))
    return ScenarioData(
        num_classes=ds.num_classes,
        input_scale=ds.input_scale,
        input_shape=ds.input_shape,
        pixel_scale=ds.pixel_scale,
        train=pool(train_idx),
        val=pool(val_idx),
        test=test,
        users=users,
    )
