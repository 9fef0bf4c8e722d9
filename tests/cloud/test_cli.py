"""`diredi sim` refuses bad scenario files with exit code 2 and a message naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.cli.main import app

WIDE = {"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}


def scenario_file(directory: Path, doc: object) -> Path:
    path = directory / "scenario.json"
    path.write_text(json.dumps(doc))
    return path


def bad_scenario(**user_fields: object) -> dict[str, object]:
    entry: dict[str, object] = {"id": "dana", "label_map": {"3": 8}, "private_train": 50, "private_test": 50}
    entry.update(user_fields)
    return {
        "name": "cli",
        "dataset": "digits",
        "seed": 1,
        "presumed": {"test_fraction": 0.25},
        "users": [entry],
    }


def flat(text: str) -> str:
    """Output with line wrapping undone."""
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (bad_scenario(noise_std=-1.0), "users.0.noise_std"),
        (bad_scenario(label_map={"3": "8"}), "users.0.label_map"),
        ({**bad_scenario(), "dataset": "imagenet"}, "dataset"),
    ],
    ids=["negative-noise", "label-map-string", "unknown-dataset"],
)
def test_sim_with_a_malformed_scenario_exits_2_naming_the_field(
    tmp_path: Path, doc: dict[str, object], field: str
) -> None:
    # Prepare
    path = scenario_file(tmp_path, doc)

    # Execute
    result = CliRunner().invoke(app, ["sim", "--scenario", str(path)], env=WIDE)

    # Assert
    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "error:" in output
    assert f"{path}: {field}:" in output
    assert "Traceback" not in output


def test_sim_with_a_scenario_that_does_not_fit_the_dataset_exits_2(tmp_path: Path) -> None:
    # Prepare: label_map target 12 passes the format but not digits' 10 classes
    path = scenario_file(tmp_path, bad_scenario(label_map={"3": 12}))

    # Execute
    result = CliRunner().invoke(app, ["sim", "--scenario", str(path)], env=WIDE)

    # Assert
    assert result.exit_code == 2, result.output
    assert "users.0.label_map: 3 -> 12 is outside" in flat(result.output)


def test_sim_with_a_missing_file_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "nowhere.json"

    # Execute
    result = CliRunner().invoke(app, ["sim", "--scenario", str(path)], env=WIDE)

    # Assert
    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"{path}: cannot read: No such file or directory" in output
    assert "Traceback" not in output


def test_sim_without_a_scenario_is_a_usage_error() -> None:
    # Execute
    result = CliRunner().invoke(app, ["sim"], env=WIDE)

    # Assert
    assert result.exit_code == 2
    assert "--scenario" in flat(result.output)


def test_help_lists_sim() -> None:
    # Execute
    result = CliRunner().invoke(app, ["--help"], env=WIDE)

    # Assert
    assert result.exit_code == 0
    assert "sim" in result.output.split()
    assert "Run the DiReDi learning loop" in flat(result.output)


def test_sim_help_lists_its_options() -> None:
    # Execute
    result = CliRunner().invoke(app, ["sim", "--help"], env=WIDE)

    # Assert
    output = flat(result.output)
    assert result.exit_code == 0
    for option in ("--scenario", "--out", "--plot"):
        assert option in output


@pytest.mark.parametrize(
    ("option", "name", "reason"),
    [
        ("--plot", "result.gif", "must end in"),
        ("--out", "result.txt", "must end in"),
        ("--plot", "no/such.png", "does not exist"),
    ],
)
def test_output_paths_are_checked_before_any_work(
    option: str, name: str, reason: str, tmp_path: Path
) -> None:
    # Prepare
    scenario = tmp_path / "scenario.json"
    scenario.write_text("{}")  # never read: the output path is refused first

    # Execute
    result = CliRunner().invoke(app, ["sim", "--scenario", str(scenario), option, str(tmp_path / name)])

    # Assert
    assert result.exit_code == 2
    assert reason in " ".join(result.output.split())
