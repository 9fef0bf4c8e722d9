"""Naming data: the --data option, a scenario's dataset, the shipped MNIST images, and pools of images
cut from a source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from cloud.exceptions import DataError, ScenarioError
from cloud.ml.data import Split, build_scenario_data
from cloud.ml.datasources import (
    DataSource,
    FolderSource,
    NpzSource,
    load_dataset,
    parse_data_option,
)
from cloud.ml.scenario import load_scenario, parse_scenario
from tests.cloud.ml.test_data import all_pools
from tests.cloud.ml.test_datasources import LABELS, VECTORS, assert_one_line_naming, write_npz

HEIGHT, WIDTH = 4, 5


def test_parse_data_option_names_built_ins_npz_files_and_image_folders(tmp_path: Path) -> None:
    # Prepare
    npz = write_npz(tmp_path / "d.npz", x=VECTORS, y=LABELS)
    folder = tmp_path / "images"
    folder.mkdir()

    # Execute
    sources = [
        parse_data_option("digits"),
        parse_data_option("mnist-5k"),
        parse_data_option(str(npz)),
        parse_data_option(str(folder)),
        parse_data_option(str(folder), "12x10", 1),
        parse_data_option(str(folder), "28X28", 3),
    ]

    # Assert
    assert sources == [
        "digits",
        "mnist-5k",
        NpzSource(npz=npz),
        FolderSource(folder=folder),
        FolderSource(folder=folder, size=(12, 10), channels=1),
        FolderSource(folder=folder, size=(28, 28), channels=3),
    ]


def test_parse_data_option_makes_a_relative_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    write_npz(tmp_path / "d.npz", x=VECTORS, y=LABELS)
    monkeypatch.chdir(tmp_path)

    # Execute
    source = parse_data_option("d.npz")

    # Assert
    assert source == NpzSource(npz=tmp_path.resolve() / "d.npz")


@pytest.mark.parametrize(
    ("text", "image_size", "channels", "says"),
    [
        pytest.param("nope", None, None, "--data nope: not digits, mnist-5k", id="garbage"),
        pytest.param("a.npz", None, None, "--data a.npz: not digits, mnist-5k", id="missing-npz"),
        pytest.param("{folder}", "12by10", None, "--image-size 12by10: must be HxW", id="size-12by10"),
        pytest.param("{folder}", "12x", None, "--image-size 12x: must be HxW", id="size-no-width"),
        pytest.param("{folder}", "0x10", None, "size must be two sides of 1..1024", id="size-zero"),
        pytest.param("{folder}", "2000x10", None, "size must be two sides of 1..1024", id="size-too-large"),
        pytest.param("{folder}", None, 2, "Input should be 1 or 3", id="channels-2"),
        pytest.param("digits", "12x10", None, "are for image folders", id="size-for-a-built-in"),
        pytest.param("mnist-5k", None, 1, "are for image folders", id="channels-for-a-built-in"),
        pytest.param("{npz}", "12x10", None, "are for image folders", id="size-for-an-npz"),
    ],
)
def test_a_bad_data_option_is_one_line_naming_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    image_size: str | None,
    channels: int | None,
    says: str,
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    write_npz(tmp_path / "d.npz", x=VECTORS, y=LABELS)
    text = text.format(folder="images", npz="d.npz")

    # Execute
    with pytest.raises(DataError, match=says) as raised:
        parse_data_option(text, image_size, channels)

    # Assert
    assert_one_line_naming(raised.value, image_size if says.startswith("--image-size") else text)


def scenario_doc(dataset: object) -> str:
    """A scenario without users (a line file) whose dataset is `dataset`."""
    doc = {"name": "data", "dataset": dataset, "seed": 1, "presumed": {"test_fraction": 0.2}}
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("dataset", "source"),
    [
        ("digits", "digits"),
        ("mnist-5k", "mnist-5k"),
        ({"npz": "data/x.npz"}, NpzSource(npz=Path("data/x.npz"))),
        ({"folder": "/srv/images"}, FolderSource(folder=Path("/srv/images"))),
        (
            {"folder": "images", "size": [12, 10], "channels": 1},
            FolderSource(folder=Path("images"), size=(12, 10), channels=1),
        ),
    ],
    ids=["digits", "mnist-5k", "npz", "folder", "folder-with-options"],
)
def test_a_scenarios_dataset_is_a_built_in_an_npz_or_a_folder(dataset: object, source: DataSource) -> None:
    # Execute
    scenario = parse_scenario(scenario_doc(dataset))

    # Assert
    assert scenario.dataset == source


@pytest.mark.parametrize(
    ("dataset", "says"),
    [
        pytest.param(
            5, 'dataset: must be "digits", "mnist-5k", {"npz": path} or {"folder": path}', id="number"
        ),
        pytest.param({"a": 1}, 'dataset: must be "digits", "mnist-5k"', id="unknown-key"),
        pytest.param(["digits"], 'dataset: must be "digits", "mnist-5k"', id="list"),
        pytest.param(None, 'dataset: must be "digits", "mnist-5k"', id="null"),
        pytest.param("imagenet", "dataset: Input should be 'digits' or 'mnist-5k'", id="unknown-name"),
        pytest.param(
            {"folder": "x", "channels": 2}, "dataset: channels: Input should be 1 or 3", id="channels-2"
        ),
        pytest.param(
            {"folder": "x", "size": [0, 5]},
            "dataset: size must be two sides",
            id="size-zero",
        ),
        pytest.param({"folder": "x", "size": [5]}, "dataset: size.1: Field required", id="size-one-side"),
        pytest.param(
            {"npz": "a.npz", "size": [2, 2]},
            "dataset: size: Extra inputs are not permitted",
            id="size-for-an-npz",
        ),
        pytest.param(
            {"npz": "a.npz", "folder": "b"},
            "dataset: folder: Extra inputs are not permitted",
            id="npz-and-folder",
        ),
    ],
)
def test_a_bad_scenario_dataset_is_one_scenario_error_naming_the_field(dataset: object, says: str) -> None:
    # Execute
    with pytest.raises(ScenarioError) as raised:
        parse_scenario(scenario_doc(dataset), "line.json")

    # Assert
    assert_one_line_naming(raised.value, "line.json: ", says)


def test_load_scenario_finds_a_relative_data_file_beside_the_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the scenario names its data relative to its own folder, not to the working directory
    lines = tmp_path / "lines"
    (lines / "data").mkdir(parents=True)
    npz = write_npz(lines / "data" / "x.npz", x=VECTORS, y=LABELS)
    (lines / "npz.json").write_text(scenario_doc({"npz": "data/x.npz"}))
    (lines / "folder.json").write_text(scenario_doc({"folder": "../images", "size": [8, 8]}))
    (lines / "absolute.json").write_text(scenario_doc({"npz": "/srv/d.npz"}))
    (lines / "built-in.json").write_text(scenario_doc("digits"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    # Execute
    npz_source = load_scenario(lines / "npz.json").dataset
    folder_source = load_scenario(lines / "folder.json").dataset
    absolute = load_scenario(lines / "absolute.json").dataset
    built_in = load_scenario(lines / "built-in.json").dataset

    # Assert
    assert npz_source == NpzSource(npz=npz.resolve())
    assert load_dataset(npz_source).labels.tolist() == LABELS.tolist()
    assert folder_source == FolderSource(folder=(tmp_path / "images").resolve(), size=(8, 8))
    assert absolute == NpzSource(npz=Path("/srv/d.npz"))
    assert built_in == "digits"


# Built-ins -------------------------------------------------------------------------------------


def test_mnist_5k_is_5000_grey_28_by_28_images_500_of_each_digit() -> None:
    # Execute
    dataset = load_dataset("mnist-5k")

    # Assert
    assert dataset.inputs.shape == (5000, 1, 28, 28)
    assert dataset.inputs.dtype == np.float32
    assert np.bincount(dataset.labels).tolist() == [500] * 10
    assert float(dataset.inputs.min()) == 0.0
    assert float(dataset.inputs.max()) == 255.0
    np.testing.assert_array_equal(dataset.inputs, np.rint(dataset.inputs))  # whole pixel values
    assert dataset.input_scale == dataset.pixel_scale == 255.0
    assert dataset.images is True
    assert dataset.class_names == tuple(str(c) for c in range(10))


# The scenario's pools, from an .npz of images ---------------------------------------------------

ROWS, SIDE, CLASSES = 400, 6, 4


def unique_images(path: Path) -> Path:
    """ROWS grey SIDE×SIDE uint8 images; image i holds i // 256 and i % 256 in its first two pixels (so
    every sample is unique and its index can be read back) and label i mod CLASSES."""
    x = np.full((ROWS, SIDE, SIDE), 128, np.uint8)
    index = np.arange(ROWS)
    x[:, 0, 0], x[:, 0, 1] = index // 256, index % 256
    return write_npz(path, x=x, y=index % CLASSES)


def image_ids(split: Split) -> npt.NDArray[np.int64]:
    """The index of each sample of a pool of unique_images (model inputs are pixels / 255)."""
    pixels = np.rint(split.x[:, 0, 0, :2] * 255.0).astype(np.int64)
    ids: npt.NDArray[np.int64] = pixels[:, 0] * 256 + pixels[:, 1]
    return ids


def image_scenario(npz: Path, seed: int = 3) -> str:
    doc = {
        "name": "images",
        "dataset": {"npz": str(npz)},
        "seed": seed,
        "presumed": {"test_fraction": 0.2, "val_fraction": 0.2},
        "users": [
            {"id": "dana", "label_map": {"1": 2}, "private_train": 20, "private_test": 10, "devices": 2},
            {"id": "eve", "private_train": 30, "private_test": 15},
        ],
    }
    return json.dumps(doc)


def test_an_npz_of_images_is_cut_into_disjoint_pools_of_images(tmp_path: Path) -> None:
    # Prepare
    spec = parse_scenario(image_scenario(unique_images(tmp_path / "images.npz")))

    # Execute
    data = build_scenario_data(spec)

    # Assert
    assert data.input_shape == (1, SIDE, SIDE)
    assert data.pixel_scale == data.input_scale == 255.0
    assert data.num_classes == CLASSES
    ids = {name: image_ids(pool) for name, pool in all_pools(data).items()}
    everything = np.concatenate(list(ids.values()))
    assert sorted(everything.tolist()) == list(range(ROWS))  # disjoint, and every sample used
    for name, pool in all_pools(data).items():
        assert pool.x.shape == (len(pool), 1, SIDE, SIDE), name
        assert pool.x.dtype == np.float32, name
    for pool in (data.train, data.val, data.test):
        np.testing.assert_array_equal(pool.y, image_ids(pool) % CLASSES)
        np.testing.assert_allclose(pool.x[:, 0, 1:, :], 128 / 255.0, rtol=1e-6)
    dana_true = image_ids(data.users[0].private_test) % CLASSES
    np.testing.assert_array_equal(data.users[0].private_test.y, np.where(dana_true == 1, 2, dana_true))


def test_pools_of_images_are_the_same_for_the_same_seed_and_differ_for_another(tmp_path: Path) -> None:
    # Prepare
    npz = unique_images(tmp_path / "images.npz")

    # Execute
    first = build_scenario_data(parse_scenario(image_scenario(npz, seed=3)))
    again = build_scenario_data(parse_scenario(image_scenario(npz, seed=3)))
    other = build_scenario_data(parse_scenario(image_scenario(npz, seed=4)))

    # Assert
    for name, pool in all_pools(first).items():
        np.testing.assert_array_equal(pool.x, all_pools(again)[name].x, err_msg=name)
        np.testing.assert_array_equal(pool.y, all_pools(again)[name].y, err_msg=name)
    assert image_ids(first.test).tolist() != image_ids(other.test).tolist()
