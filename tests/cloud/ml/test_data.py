"""The scenario's pools (DESIGN §3): disjoint, deterministic, in each user's world (label_map, noise)."""

from __future__ import annotations

import json

import numpy as np
import numpy.typing as npt
import pytest

from cloud.exceptions import DataError
from cloud.ml.data import ScenarioData, Split, build_scenario_data
from cloud.ml.datasources import Dataset, load_dataset
from cloud.ml.scenario import Scenario, parse_scenario

SYNTHETIC_ROWS = 1000
SYNTHETIC_SCALE = 16.0
WIDTH = 64


def make_scenario(
    *,
    seed: int = 5,
    test_fraction: float = 0.25,
    val_fraction: float = 0.15,
    users: list[dict[str, object]] | None = None,
) -> Scenario:
    if users is None:
        users = [
            {"id": "dana", "label_map": {"3": 8}, "private_train": 60, "private_test": 40, "devices": 3},
            {
                "id": "bob",
                "label_map": {"1": 7, "7": 1},
                "noise_std": 2.0,
                "private_train": 80,
                "private_test": 50,
            },
            {"id": "eve", "label_map": {}, "private_train": 30, "private_test": 20},
        ]
    doc = {
        "name": "pools",
        "dataset": "digits",
        "seed": seed,
        "presumed": {"test_fraction": test_fraction, "val_fraction": val_fraction},
        "users": users,
    }
    return parse_scenario(json.dumps(doc))


def synthetic_digits(rows: int = SYNTHETIC_ROWS) -> Dataset:
    """A dataset whose every row is unique: row i holds 64·i … 64·i + 63; its label is i mod 10."""
    return Dataset(
        name="digits",
        inputs=np.arange(rows * WIDTH).reshape(rows, WIDTH).astype(np.float32),
        labels=np.arange(rows, dtype=np.int64) % 10,
        num_classes=10,
        input_scale=SYNTHETIC_SCALE,
    )


def row_ids(split: Split) -> npt.NDArray[np.int64]:
    """The synthetic dataset's row index of every sample (noise of a few units cannot hide it)."""
    return np.rint(split.x[:, 0] * SYNTHETIC_SCALE / WIDTH).astype(np.int64)


def all_pools(data: ScenarioData) -> dict[str, Split]:
    pools = {"train": data.train, "val": data.val, "test": data.test}
    for user in data.users:
        for i, device in enumerate(user.device_train):
            pools[f"{user.spec.id}.device{i}"] = device
        pools[f"{user.spec.id}.private_test"] = user.private_test
    return pools


def clean_rows(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """The synthetic rows `ids`, scaled to model units, without noise."""
    return (synthetic_digits().inputs[ids] / SYNTHETIC_SCALE).astype(np.float32)


def test_pools_are_disjoint_and_cover_the_dataset() -> None:
    # Prepare
    spec = make_scenario()

    # Execute
    data = build_scenario_data(spec, synthetic_digits())

    # Assert
    ids = {name: row_ids(pool) for name, pool in all_pools(data).items()}
    everything = np.concatenate(list(ids.values()))
    assert len(everything) == SYNTHETIC_ROWS
    assert set(everything.tolist()) == set(range(SYNTHETIC_ROWS))
    for name, pool_ids in ids.items():
        assert len(set(pool_ids.tolist())) == len(pool_ids), name


def test_pool_sizes_add_up_to_digits() -> None:
    # Prepare
    spec = make_scenario()

    # Execute
    data = build_scenario_data(spec)

    # Assert
    sizes = {name: len(pool) for name, pool in all_pools(data).items()}
    assert sum(sizes.values()) == 1797
    assert sizes["dana.device0"] == sizes["dana.device2"] == 60
    assert sizes["bob.private_test"] == 50
    assert len(data.users[0].device_train) == 3


def test_presumed_fractions_are_respected() -> None:
    # Prepare: 1000 - (3·60 + 40 + 80 + 50 + 30 + 20) = 600 presumed samples
    spec = make_scenario(test_fraction=0.3, val_fraction=0.2)

    # Execute
    data = build_scenario_data(spec, synthetic_digits())

    # Assert
    assert (len(data.test), len(data.val), len(data.train)) == (180, 120, 300)


def test_presumed_pools_are_scaled_and_keep_their_labels() -> None:
    # Prepare
    spec = make_scenario()

    # Execute
    data = build_scenario_data(spec, synthetic_digits())

    # Assert
    for split in (data.train, data.val, data.test):
        ids = row_ids(split)
        assert split.x.dtype == np.float32
        assert split.y.dtype == np.int64
        np.testing.assert_array_equal(split.x, clean_rows(ids))
        np.testing.assert_array_equal(split.y, ids % 10)


def test_same_seed_builds_the_same_pools() -> None:
    # Prepare
    spec = make_scenario(seed=11)

    # Execute
    first, second = build_scenario_data(spec), build_scenario_data(spec)

    # Assert: noise included
    for name, pool in all_pools(first).items():
        other = all_pools(second)[name]
        np.testing.assert_array_equal(pool.x, other.x, err_msg=name)
        np.testing.assert_array_equal(pool.y, other.y, err_msg=name)
    np.testing.assert_array_equal(first.users[1].world_test.x, second.users[1].world_test.x)


def test_another_seed_builds_other_pools() -> None:
    # Prepare
    dataset = synthetic_digits()

    # Execute
    first = build_scenario_data(make_scenario(seed=11), dataset)
    second = build_scenario_data(make_scenario(seed=12), dataset)

    # Assert
    assert set(row_ids(first.test).tolist()) != set(row_ids(second.test).tolist())
    assert set(row_ids(first.users[0].device_train[0]).tolist()) != set(
        row_ids(second.users[0].device_train[0]).tolist()
    )


def test_label_map_is_applied_to_the_users_pools() -> None:
    # Prepare: dana labels 3 as 8; bob swaps 1 and 7 (each applied once, not chained)
    spec = make_scenario()

    # Execute
    data = build_scenario_data(spec, synthetic_digits())

    # Assert
    dana, bob, eve = data.users
    for split in [*dana.device_train, dana.private_test, dana.world_test]:
        true = row_ids(split) % 10
        np.testing.assert_array_equal(split.y, np.where(true == 3, 8, true))
    swap = {1: 7, 7: 1}
    for split in [*bob.device_train, bob.private_test, bob.world_test]:
        true = row_ids(split) % 10
        np.testing.assert_array_equal(split.y, [swap.get(int(c), int(c)) for c in true])
    for split in [*eve.device_train, eve.private_test]:
        np.testing.assert_array_equal(split.y, row_ids(split) % 10)
    assert (dana.private_test.y != 3).all()


def test_label_map_leaves_presumed_pools_alone() -> None:
    # Prepare
    spec = make_scenario()

    # Execute
    data = build_scenario_data(spec, synthetic_digits())

    # Assert
    assert (data.train.y == 3).any()
    assert (data.test.y == 3).any()


def test_noise_has_the_std_of_the_scenario_in_model_units() -> None:
    # Prepare: bob's noise_std is 2.0 pixels; model inputs are pixels / 16
    spec = make_scenario()

    # Execute
    data = build_scenario_data(spec, synthetic_digits())

    # Assert
    bob, eve = data.users[1], data.users[2]
    for split in (bob.device_train[0], bob.private_test):
        residual = split.x - clean_rows(row_ids(split))
        assert abs(float(residual.std()) - 2.0 / SYNTHETIC_SCALE) < 0.01
        assert abs(float(residual.mean())) < 0.01
    np.testing.assert_array_equal(eve.private_test.x, clean_rows(row_ids(eve.private_test)))


def test_noise_on_real_digits_is_in_model_units() -> None:
    # Prepare: same pools with and without noise (the noise is the only difference)
    noisy = make_scenario(users=[{"id": "bob", "noise_std": 4.0, "private_train": 200, "private_test": 50}])
    clean = make_scenario(users=[{"id": "bob", "noise_std": 0.0, "private_train": 200, "private_test": 50}])

    # Execute
    with_noise, without_noise = build_scenario_data(noisy), build_scenario_data(clean)

    # Assert
    residual = with_noise.users[0].device_train[0].x - without_noise.users[0].device_train[0].x
    assert abs(float(residual.std()) - 4.0 / 16.0) < 0.01
    np.testing.assert_array_equal(with_noise.test.x, without_noise.test.x)


def test_world_test_is_private_test_plus_presumed_test_in_the_users_world() -> None:
    # Prepare
    spec = make_scenario()

    # Execute
    data = build_scenario_data(spec, synthetic_digits())

    # Assert
    dana, bob = data.users[0], data.users[1]
    n_private = len(dana.private_test)
    assert len(dana.world_test) == n_private + len(data.test)
    np.testing.assert_array_equal(dana.world_test.x[:n_private], dana.private_test.x)
    np.testing.assert_array_equal(dana.world_test.y[:n_private], dana.private_test.y)
    np.testing.assert_array_equal(dana.world_test.x[n_private:], data.test.x)
    np.testing.assert_array_equal(dana.world_test.y[n_private:], np.where(data.test.y == 3, 8, data.test.y))
    # bob's view of the presumed test carries his noise: same rows, not the same pixels
    bob_test = bob.world_test.x[len(bob.private_test) :]
    np.testing.assert_array_equal(row_ids(Split(bob_test, data.test.y)), row_ids(data.test))
    residual = bob_test - data.test.x
    assert abs(float(residual.std()) - 2.0 / SYNTHETIC_SCALE) < 0.01


def test_load_dataset_digits() -> None:
    # Execute
    dataset = load_dataset("digits")

    # Assert
    assert dataset.inputs.shape == (1797, 64)
    assert dataset.inputs.dtype == np.float32
    assert dataset.labels.dtype == np.int64
    assert set(dataset.labels.tolist()) == set(range(10))
    assert dataset.num_classes == 10
    assert float(dataset.inputs.max()) == dataset.input_scale == 16.0


def test_load_dataset_refuses_unknown_names() -> None:
    # Execute
    with pytest.raises(DataError, match="nope"):
        load_dataset("nope")  # type: ignore[arg-type]
