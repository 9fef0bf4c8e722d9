"""Generated scenario suites: deterministic, valid, fitting the dataset, every preference kind; the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.ml.datasources import load_dataset
from cloud.ml.scenario import Scenario, load_scenario
from cloud.sim.generate import (
    DIGITS_CLASSES,
    DIGITS_SAMPLES,
    KINDS,
    PRIVATE_SHARE,
    generate_scenario,
    generate_scenarios,
    preference_kind,
)

WIDE = {"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}


def flat(text: str) -> str:
    """Output with line wrapping undone."""
    return " ".join(text.split())


def test_the_same_count_and_seed_give_the_same_suite() -> None:
    # Execute
    first, second = generate_scenarios(20, 4), generate_scenarios(20, 4)

    # Assert
    assert [s.model_dump() for s in first] == [s.model_dump() for s in second]


def test_scenario_i_depends_only_on_seed_and_i() -> None:
    # Execute
    suite = generate_scenarios(5, 4)

    # Assert
    assert suite[3] == generate_scenario(4, 3)
    assert generate_scenarios(3, 4) == suite[:3]


def test_different_seeds_give_different_suites_with_different_names() -> None:
    # Execute
    a, b = generate_scenarios(10, 1), generate_scenarios(10, 2)

    # Assert
    assert {s.name for s in a}.isdisjoint(s.name for s in b)
    strip = [{**s.model_dump(), "name": ""} for s in a]
    assert all({**s.model_dump(), "name": ""} not in strip for s in b)


def test_every_kind_appears_and_about_one_user_in_five_has_no_preference() -> None:
    # Execute
    users = [u for s in generate_scenarios(200, 0) for u in s.users]

    # Assert
    kinds = Counter(preference_kind(u.label_map) for u in users)
    assert set(kinds) == set(KINDS)
    assert 0.12 < kinds["none"] / len(users) < 0.28


def test_every_user_id_names_its_kind_and_the_kind_matches_its_label_map() -> None:
    # Execute
    users = [u for s in generate_scenarios(100, 7) for u in s.users]

    # Assert
    for user in users:
        assert user.id.split("-", 1)[1] == preference_kind(user.label_map)


def test_every_generated_scenario_validates_and_fits_the_dataset() -> None:
    # Prepare: the generator's constants are the dataset's real shape
    digits = load_dataset("digits")
    assert (digits.num_classes, len(digits.labels)) == (DIGITS_CLASSES, DIGITS_SAMPLES)

    # Execute
    suite = generate_scenarios(300, 11)

    # Assert
    for scenario in suite:
        Scenario.model_validate(scenario.model_dump(mode="json"))
        scenario.check_against(DIGITS_CLASSES, DIGITS_SAMPLES)
        assert 1 <= len(scenario.users) <= 4
        assert 0.15 <= scenario.presumed.test_fraction <= 0.3
        assert 0.15 <= scenario.presumed.val_fraction <= 0.25
        for user in scenario.users:
            assert 0.0 <= user.noise_std <= 2.0
            assert round(user.noise_std, 1) == user.noise_std
            assert 1 <= user.devices <= 5
            assert 20 <= user.private_train <= 150
            assert 60 <= user.private_test <= 150


def test_pools_too_large_for_the_dataset_are_shrunk_to_just_fit() -> None:
    # Prepare
    budget = int(DIGITS_SAMPLES * PRIVATE_SHARE)

    # Execute
    suite = generate_scenarios(300, 11)

    # Assert: no scenario's users take more than their share, and those drawn too large take it all
    used = [sum(u.devices * u.private_train + u.private_test for u in s.users) for s in suite]
    assert max(used) <= budget
    assert any(budget - 5 < n for n in used)


@pytest.mark.parametrize(
    ("label_map", "kind"),
    [
        ({}, "none"),
        ({3: 3}, "none"),
        ({3: 8}, "merge"),
        ({1: 7, 4: 9}, "merge"),
        ({1: 7, 4: 7, 5: 7}, "merge"),
        ({1: 2, 2: 3}, "merge"),  # a chain loses class 1: a merge, nothing is exchanged
        ({3: 8, 8: 3}, "swap"),
        ({1: 2, 2: 1, 3: 4, 4: 3}, "swap"),
        ({1: 2, 2: 3, 3: 1}, "cycle"),
        ({0: 1, 1: 2, 2: 3, 3: 0}, "cycle"),
        ({1: 2, 2: 1, 5: 5, 6: 7, 7: 8, 8: 6}, "cycle"),
        ({3: 8, 8: 3, 5: 6}, "mix"),
        ({3: 8, 8: 3, 5: 3}, "mix"),
        ({1: 2, 2: 3, 3: 1, 9: 0}, "mix"),
        ({4: 1, 1: 2, 2: 3, 3: 1}, "mix"),  # a tail leading into a cycle
    ],
)
def test_preference_kind_classifies_hand_made_maps(label_map: dict[int, int], kind: str) -> None:
    # Execute / Assert
    assert preference_kind(label_map) == kind


def test_generate_without_a_count_or_with_a_negative_seed_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="must not be negative"):
        generate_scenarios(3, -1)
    assert generate_scenarios(0, 5) == []


def test_cli_writes_count_files_that_load_back_as_the_generated_scenarios(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "suite" / "nested"

    # Execute
    result = CliRunner().invoke(
        app, ["scenarios", "generate", "--count", "6", "--seed", "3", "--out", str(out)], env=WIDE
    )

    # Assert
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"gen-s3-{i}.json" for i in range(6)]
    assert [load_scenario(out / f"gen-s3-{i}.json") for i in range(6)] == generate_scenarios(6, 3)
    assert "wrote 6 scenarios" in flat(result.output)
    assert isinstance(json.loads((out / "gen-s3-0.json").read_text())["users"], list)


@pytest.mark.parametrize(
    ("count", "seed", "message"),
    [
        ("0", "1", "--count must be between 1 and 1000, got 0"),
        ("1001", "1", "--count must be between 1 and 1000, got 1001"),
        ("-3", "1", "--count must be between 1 and 1000, got -3"),
        ("2", "-1", "--seed must not be negative, got -1"),
    ],
    ids=["zero", "too-many", "negative-count", "negative-seed"],
)
def test_cli_refuses_a_bad_count_or_seed_with_exit_2(
    tmp_path: Path, count: str, seed: str, message: str
) -> None:
    # Execute
    result = CliRunner().invoke(
        app,
        ["scenarios", "generate", "--count", count, "--seed", seed, "--out", str(tmp_path / "o")],
        env=WIDE,
    )

    # Assert
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in flat(result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_out_that_is_a_file_with_exit_2(tmp_path: Path) -> None:
    # Prepare
    taken = tmp_path / "taken.json"
    taken.write_text("{}")

    # Execute
    result = CliRunner().invoke(
        app, ["scenarios", "generate", "--count", "2", "--seed", "1", "--out", str(taken)], env=WIDE
    )

    # Assert
    assert result.exit_code == 2, result.output
    assert f"error: --out {taken}: exists and is not a directory" in flat(result.output)


def test_cli_refuses_an_out_it_cannot_create_with_exit_2(tmp_path: Path) -> None:
    # Prepare: a directory below a file cannot be created
    blocker = tmp_path / "file"
    blocker.write_text("")

    # Execute
    result = CliRunner().invoke(
        app,
        ["scenarios", "generate", "--count", "2", "--seed", "1", "--out", str(blocker / "sub")],
        env=WIDE,
    )

    # Assert
    assert result.exit_code == 2, result.output
    assert f"error: --out {blocker / 'sub'}: cannot create:" in flat(result.output)


def test_an_mnist_suite_draws_what_the_digits_suite_draws_with_noise_in_pixel_levels() -> None:
    # Execute
    digits, mnist = generate_scenarios(20, 7), generate_scenarios(20, 7, "mnist-5k")

    # Assert: the same users and preferences, noise scaled to 0..255, pools within mnist-5k's share
    for d, m in zip(digits, mnist, strict=True):
        assert m.name == d.name.replace("gen-", "gen-mnist-5k-") and m.dataset == "mnist-5k"
        assert [u.label_map for u in m.users] == [u.label_map for u in d.users]
        for du, mu in zip(d.users, m.users, strict=True):
            assert mu.noise_std == pytest.approx(du.noise_std * 16, abs=0.85)  # both rounded to 0.1
        m.check_against(10, 5000)
    assert max(u.noise_std for s in mnist for u in s.users) <= 32.0


def test_cli_generates_an_mnist_suite_and_refuses_an_unknown_dataset(tmp_path: Path) -> None:
    # Execute
    made = CliRunner().invoke(
        app,
        ["scenarios", "generate", "--count", "2", "--seed", "3", "--out", str(tmp_path / "m")]
        + ["--dataset", "mnist-5k"],
        env=WIDE,
    )
    refused = CliRunner().invoke(
        app,
        ["scenarios", "generate", "--count", "2", "--seed", "3", "--out", str(tmp_path / "x")]
        + ["--dataset", "imagenet"],
        env=WIDE,
    )

    # Assert
    assert made.exit_code == 0, made.output
    assert {load_scenario(p).dataset for p in (tmp_path / "m").glob("*.json")} == {"mnist-5k"}
    assert refused.exit_code == 2 and "--dataset must be digits or mnist-5k" in flat(refused.output)
