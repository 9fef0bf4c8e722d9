"""A manufacturer's own data and model: an image folder and an `.npz` built here, a family named by its
import path; line creation and one RD cycle on each, through the registry as the CLI and workers run
them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import FamilyError
from cloud.ml.data import build_scenario_data
from cloud.ml.datasources import FolderSource, NpzSource, load_dataset
from cloud.ml.families import NetSpec, check_family
from cloud.ml.line import silent
from cloud.ml.scenario import PresumedSplit, Scenario, UserSpec
from cloud.pipeline import cycle, scheduling
from cloud.pipeline.lines import bootstrap_line, load_line
from cloud.registry import jobs, models
from cloud.registry.db import transaction
from tests.cloud.factories import make_cohort, make_device
from tests.cloud.lines import report_knowledge

pytestmark = pytest.mark.slow

CLASSES = ("zero", "one", "two", "three")
PER_CLASS = 90
TINY = "tests.cloud.families:tiny"


@pytest.fixture(scope="module")
def digits() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """MNIST images of the digits 0–3 (28×28 grey, uint8), PER_CLASS of each."""
    mnist = load_dataset("mnist-5k")
    keep = np.concatenate([np.flatnonzero(mnist.labels == c)[:PER_CLASS] for c in range(len(CLASSES))])
    return mnist.inputs[keep, 0].astype(np.uint8), mnist.labels[keep]


@pytest.fixture(scope="module")
def image_folder(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]
) -> Path:
    """One subfolder of PNG files per class, named by the class."""
    root = tmp_path_factory.mktemp("images")
    images, labels = digits
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def npz_file(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]
) -> Path:
    """The same images as N×H×W×1 (channels last, as image libraries give them), labels, class names."""
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    images, labels = digits
    np.savez(path, x=images[..., None], y=labels, class_names=np.array(CLASSES))
    return path


def own_scenario(source: FolderSource | NpzSource, family: str | None) -> Scenario:
    """One user who calls every "one" a "two"."""
    user = UserSpec.model_validate(
        {"id": "erin", "label_map": {"1": 2}, "private_train": 60, "private_test": 40}
    )
    return Scenario(
        name="own-data",
        dataset=source,
        family=family,
        seed=4,
        presumed=PresumedSplit(test_fraction=0.2),
        users=[user],
    )


# One backend each: the registry's paths are tested on both elsewhere, this is about the data.
@pytest.mark.parametrize(
    ("migrated_engine", "kind"), [("sqlite", "folder"), ("postgresql", "npz")], indirect=["migrated_engine"]
)
def test_a_line_on_own_data_learns_a_preference_in_one_cycle(
    kind: str, sessions: sessionmaker[Session], tmp_path: Path, image_folder: Path, npz_file: Path
) -> None:
    # Prepare: the folder trains the built-in conv family, the npz the test module's own family
    source = FolderSource(folder=image_folder) if kind == "folder" else NpzSource(npz=npz_file)
    scenario = own_scenario(source, None if kind == "folder" else TINY)
    store = LocalArtifactStore(tmp_path / "artifacts")
    with transaction(sessions) as session:
        make_cohort(session, "own")
        make_device(session, "cam-1", "own")

    # Execute: line creation, as `diredi line create` runs it, then one RD cycle on real knowledge
    _, edge_id = bootstrap_line(sessions, store, cohort_id="own", scenario=scenario, progress=silent)
    with transaction(sessions) as session:
        models.decide(session, edge_id, approve=True)
        v1, spec = load_line(session, store, edge_id)
    data = build_scenario_data(scenario)
    report_knowledge(sessions, v1, data, "cam-1")
    with transaction(sessions) as session:
        job_id = scheduling.create_cycle_job(session, cohort_id="own", trigger="test").id
    outcome = cycle.run_cycle_job(sessions, store, job_id, owner="worker-a", lease_s=60.0)

    # Assert: the line is the family asked for, on the data's shape; v2 follows the user
    assert spec == NetSpec("conv" if kind == "folder" else TINY, (1, 28, 28), 4)
    manifest = v1.artifact.manifest
    assert manifest.input.shape == [1, 1, 28, 28] and manifest.pixel_scale == 255.0
    assert outcome.outcome == "approved", outcome.reason
    with sessions() as session:
        v2, _ = load_line(session, store, str(outcome.edge_model_id))
        assert jobs.get_job(session, job_id).result["outcome"] == "approved"
    assert v2.artifact.manifest.pixel_scale == 255.0
    world = data.users[0].world_test
    ones = data.test.y == 1
    assert (v2.artifact.load().predict(data.test.x[ones]) == 2).mean() > 0.8
    before = (v1.artifact.load().predict(world.x) == world.y).mean()
    after = (v2.artifact.load().predict(world.x) == world.y).mean()
    assert after > before + 0.1


@pytest.mark.parametrize(
    ("factory", "says"),
    [
        ("one_module", "must return (teacher, student)"),
        ("two_layer_head", "must be one nn.Linear over the features"),
        ("shortcut", "forward(x) is not head(features(x))"),
        ("float_only", "the student cannot be exported: the model is not fully int8"),
        ("broken", "the factory fails: RuntimeError: the factory's own bug"),
        ("wide", "the head (3×2048 floats) is too large"),
        ("absent", "has no callable absent"),
    ],
)
def test_a_family_that_breaks_the_contract_is_refused_in_one_line(factory: str, says: str) -> None:
    # Prepare
    spec = NetSpec(f"tests.cloud.families:{factory}", (1, 12, 12), 3)
    sample = np.random.default_rng(0).random((16, 1, 12, 12), dtype=np.float32)

    # Execute
    with pytest.raises(FamilyError) as refused:
        check_family(spec, sample)

    # Assert
    message = str(refused.value)
    assert says in message and "\n" not in message
    assert message.startswith(f"family 'tests.cloud.families:{factory}'")


@pytest.mark.parametrize(
    ("family", "shape", "says"),
    [
        ("conv", (64,), "the conv family takes images of shape C×H×W"),
        ("nope", (64,), "not one of mlp, conv nor an import path"),
        ("no_such_module_here:f", (64,), "cannot import no_such_module_here"),
    ],
)
def test_a_family_that_cannot_be_built_says_why(family: str, shape: tuple[int, ...], says: str) -> None:
    # Execute
    with pytest.raises(FamilyError, match=says):
        NetSpec(family, shape, 10).build()


def test_the_worked_example_family_keeps_the_contract() -> None:
    # Prepare
    spec = NetSpec("examples.families.lenet:family", (1, 28, 28), 10)

    # Execute
    check_family(spec, np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32))
    teacher, student = spec.build()

    # Assert
    assert student.head.in_features == 84 and student.head.out_features == 10
