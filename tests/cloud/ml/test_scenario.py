"""Scenario files (DESIGN §3): the shipped examples load, defaults apply, every malformed file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud.exceptions import ScenarioError
from cloud.ml.data import build_scenario_data
from cloud.ml.scenario import MAX_SCENARIO_BYTES, Scenario, load_scenario, load_simulation, parse_scenario

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"


def user(**fields: object) -> dict[str, object]:
    """A valid user entry, with `fields` replacing or adding keys."""
    entry: dict[str, object] = {
        "id": "dana",
        "label_map": {"3": 8},
        "noise_std": 0.5,
        "private_train": 100,
        "private_test": 100,
    }
    entry.update(fields)
    return entry


def scenario(**fields: object) -> dict[str, object]:
    """A valid scenario document, with `fields` replacing or adding top-level keys."""
    doc: dict[str, object] = {
        "name": "case",
        "dataset": "digits",
        "seed": 4,
        "presumed": {"test_fraction": 0.25},
        "users": [user()],
    }
    doc.update(fields)
    return doc


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


def without(doc: dict[str, object], key: str) -> dict[str, object]:
    return {k: v for k, v in doc.items() if k != key}


def write(directory: Path, content: bytes | None) -> Path:
    """The scenario file under `directory`; with None, a path where no file exists."""
    path = directory / "scenario.json"
    if content is not None:
        path.write_bytes(content)
    return path


# (id, file content or None for a missing file, text the error must contain)
MALFORMED: list[tuple[str, bytes | None, str]] = [
    ("not-json", b'{"name": "case", ', "not valid JSON"),
    ("json-list", encode([scenario()]), "(top level)"),
    ("missing-name", encode(without(scenario(), "name")), ": name:"),
    (
        "dataset-imagenet",
        encode(scenario(dataset="imagenet")),
        ": dataset: Input should be 'digits'",
    ),
    (
        "dataset-a-number",
        encode(scenario(dataset=5)),
        ': dataset: must be "digits", "mnist-5k", {"npz": path}',
    ),
    ("negative-seed", encode(scenario(seed=-1)), ": seed:"),
    ("test-fraction-0", encode(scenario(presumed={"test_fraction": 0})), ": presumed.test_fraction:"),
    ("test-fraction-1.5", encode(scenario(presumed={"test_fraction": 1.5})), ": presumed.test_fraction:"),
    (
        "fractions-leave-under-20pc",
        encode(scenario(presumed={"test_fraction": 0.5, "val_fraction": 0.35})),
        ": presumed: Value error, test_fraction + val_fraction",
    ),
    ("val-fraction-0", encode(scenario(presumed={"test_fraction": 0.25, "val_fraction": 0})), "val_fraction"),
    ("no-users", encode(scenario(users=[])), ": users:"),
    ("users-missing", encode(without(scenario(), "users")), ": users:"),
    ("bad-user-id-upper", encode(scenario(users=[user(id="Dana")])), ": users.0.id:"),
    ("bad-user-id-short", encode(scenario(users=[user(), user(id="ab")])), ": users.1.id:"),
    ("label-map-key-x", encode(scenario(users=[user(label_map={"x": 8})])), ": users.0.label_map:"),
    ("label-map-value-str", encode(scenario(users=[user(label_map={"3": "8"})])), ": users.0.label_map:"),
    ("label-map-value-true", encode(scenario(users=[user(label_map={"3": True})])), ": users.0.label_map:"),
    ("label-map-value-float", encode(scenario(users=[user(label_map={"3": 8.5})])), ": users.0.label_map:"),
    ("negative-noise", encode(scenario(users=[user(noise_std=-0.1)])), ": users.0.noise_std:"),
    (
        "nan-noise",
        encode(scenario(users=[user(noise_std=0.0)])).replace(b'"noise_std": 0.0', b'"noise_std": NaN'),
        ": users.0.noise_std:",
    ),
    ("private-train-0", encode(scenario(users=[user(private_train=0)])), ": users.0.private_train:"),
    ("private-test-missing", encode(scenario(users=[without(user(), "private_test")])), "private_test"),
    ("devices-0", encode(scenario(users=[user(devices=0)])), ": users.0.devices:"),
    ("extra-top-field", encode(scenario(colour="blue")), ": colour:"),
    ("extra-user-field", encode(scenario(users=[user(age=40)])), ": users.0.age:"),
    ("missing-file", None, "cannot read"),
    ("over-1-MiB", encode(scenario()) + b" " * MAX_SCENARIO_BYTES, "larger than"),
    ("non-utf8", encode(scenario(name="cafe")).replace(b"cafe", b"caf\xe9"), "not valid JSON"),
]


def test_shipped_scenarios_load() -> None:
    # Prepare
    paths = sorted(SCENARIOS.glob("*.json"))

    # Execute
    loaded = {p.stem: load_scenario(p) for p in paths}

    # Assert
    assert set(loaded) == {"digits-one-user", "digits-two-users", "mnist-two-users"}
    mnist = loaded["mnist-two-users"]
    assert (mnist.dataset, mnist.family) == ("mnist-5k", "conv")
    assert [u.label_map for u in mnist.users] == [{4: 9}, {1: 7, 3: 5}]
    two = loaded["digits-two-users"]
    assert [u.id for u in two.users] == ["alice", "bob"]
    assert two.users[1].label_map == {1: 7, 4: 9}
    assert two.users[1].noise_std == 1.0
    assert loaded["digits-one-user"].users[0].label_map == {5: 6}


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_scenarios_fit_the_dataset(path: Path) -> None:
    # Prepare
    spec = load_scenario(path)

    # Execute
    data = build_scenario_data(spec)

    # Assert
    assert [u.spec.id for u in data.users] == [u.id for u in spec.users]


def test_optional_fields_take_their_defaults() -> None:
    # Prepare
    text = encode(scenario(users=[without(without(user(), "devices"), "noise_std")]))

    # Execute
    spec = parse_scenario(text)

    # Assert
    assert spec.presumed.val_fraction == 0.15
    assert spec.users[0].devices == 1
    assert spec.users[0].noise_std == 0.0


def test_optional_fields_are_accepted() -> None:
    # Prepare
    text = encode(
        scenario(presumed={"test_fraction": 0.2, "val_fraction": 0.1}, users=[user(devices=3, label_map={})])
    )

    # Execute
    spec = parse_scenario(text)

    # Assert
    assert spec.presumed.val_fraction == 0.1
    assert spec.users[0].devices == 3
    assert spec.users[0].label_map == {}


def test_label_map_keys_become_class_numbers() -> None:
    # Prepare
    text = encode(scenario(users=[user(label_map={"1": 7, "4": 9})]))

    # Execute
    spec = parse_scenario(text)

    # Assert
    assert spec.users[0].label_map == {1: 7, 4: 9}


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_file_is_one_scenario_error_naming_the_field(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    # Prepare
    path = write(tmp_path, content)

    # Execute: as a simulation reads it (a line file may have no users)
    with pytest.raises(ScenarioError) as caught:
        load_simulation(path)

    # Assert: the message names the file and the field (or why the file is unreadable)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert expected in message
    assert type(caught.value) is ScenarioError


def test_duplicate_user_ids_name_the_users_field() -> None:
    # Prepare
    text = encode(scenario(users=[user(), user()]))

    # Execute
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text)

    # Assert
    assert "scenario: users" in str(caught.value)


def test_duplicate_user_ids_are_refused() -> None:
    # Prepare
    text = encode(scenario(users=[user(), user(label_map={})]))

    # Execute
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text)

    # Assert
    assert "user ids must be unique" in str(caught.value)
    assert "'dana', 'dana'" in str(caught.value)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (scenario(seed=True), "seed"),
        (scenario(users=[user(devices=True)]), "users.0.devices"),
        (scenario(users=[user(private_train="100")]), "users.0.private_train"),
        (scenario(users=[user(noise_std="0.5")]), "users.0.noise_std"),
    ],
    ids=["seed-true", "devices-true", "private-train-str", "noise-str"],
)
def test_json_types_are_not_coerced(doc: dict[str, object], field: str) -> None:
    # Prepare
    text = encode(doc)

    # Execute
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text)

    # Assert
    assert field in str(caught.value)


def test_parse_names_the_source() -> None:
    # Prepare
    text = encode(scenario(seed=-5))

    # Execute
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, source="fleet/alice.json")

    # Assert
    assert str(caught.value).startswith("fleet/alice.json: seed:")


def test_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    # Prepare: valid JSON padded with whitespace up to the limit
    body = encode(scenario())
    path = write(tmp_path, body + b" " * (MAX_SCENARIO_BYTES - len(body)))

    # Execute
    spec = load_scenario(path)

    # Assert
    assert spec.name == "case"


def test_directory_is_a_scenario_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "dir.json"
    path.mkdir()

    # Execute
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)

    # Assert
    assert "cannot read" in str(caught.value)


@pytest.mark.parametrize(
    ("label_map", "expected"),
    [({"3": 10}, "3 -> 10"), ({"12": 1}, "12 -> 1"), ({"3": -1}, "3 -> -1")],
    ids=["target-10", "source-12", "target-negative"],
)
def test_check_against_refuses_classes_outside_the_dataset(label_map: dict[str, int], expected: str) -> None:
    # Prepare
    spec = parse_scenario(encode(scenario(users=[user(id="eve", label_map={}), user(label_map=label_map)])))

    # Execute
    with pytest.raises(ScenarioError) as caught:
        build_scenario_data(spec)

    # Assert
    message = str(caught.value)
    assert message.startswith("users.1.label_map:")
    assert expected in message
    assert "0..9" in message


@pytest.mark.parametrize(
    "users",
    [
        [user(private_train=1400, private_test=100)],
        [user(private_train=300, private_test=100, devices=5)],
        [user(private_train=700, private_test=10), user(id="eve", private_train=660, private_test=10)],
    ],
    ids=["one-big-user", "many-devices", "two-users"],
)
def test_check_against_refuses_private_pools_that_eat_the_dataset(users: list[dict[str, object]]) -> None:
    # Prepare: more than 3/4 of digits' 1797 samples would be private
    spec = parse_scenario(encode(scenario(users=users)))

    # Execute
    with pytest.raises(ScenarioError) as caught:
        build_scenario_data(spec)

    # Assert
    message = str(caught.value)
    assert message.startswith("users: private pools take")
    assert "of 1797 samples" in message


def test_check_against_accepts_private_pools_leaving_a_quarter() -> None:
    # Prepare: 1797 - 1347 = 450 >= 1797 // 4 = 449
    spec: Scenario = parse_scenario(encode(scenario(users=[user(private_train=1247, private_test=100)])))

    # Execute
    data = build_scenario_data(spec)

    # Assert
    assert len(data.train) + len(data.val) + len(data.test) == 450


def test_label_map_keys_must_be_canonical_class_numbers() -> None:
    # Prepare: "03" and "3" would collapse into one entry and silently lose one mapping
    doc = scenario(users=[user(label_map={"03": 8, "3": 9})])

    # Execute / Assert
    with pytest.raises(ScenarioError, match="label_map"):
        parse_scenario(encode(doc))


def test_user_ids_leave_room_for_device_suffixes() -> None:
    # Prepare: the simulation names devices "<id>-d<k>", which must still be a device id (≤ 63)
    doc = scenario(users=[user(id="a" * 57)])

    # Execute / Assert
    with pytest.raises(ScenarioError, match=r"users\.0\.id"):
        parse_scenario(encode(doc))
