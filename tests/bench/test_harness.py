"""The benchmarks' harness: their command line, PostgreSQL from the environment, the machine, the JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from bench import harness


def test_the_parser_describes_the_benchmark_by_its_first_line_and_writes_to_its_results_file() -> None:
    # Execute
    parser = harness.parser("Benchmark of something.\n\nAt length, here.", "something")
    args = parser.parse_args([])

    # Assert
    assert parser.description == "Benchmark of something."
    assert args.out == harness.RESULTS / "something.json"
    assert harness.RESULTS == Path(__file__).resolve().parents[2] / "bench" / "results"


def test_out_sends_the_results_elsewhere(tmp_path: Path) -> None:
    # Prepare
    parser = harness.parser("Benchmark.", "something")
    parser.add_argument("--messages", type=int, default=10)

    # Execute
    args = parser.parse_args(["--out", str(tmp_path / "mine.json"), "--messages", "3"])

    # Assert
    assert args.out == tmp_path / "mine.json"
    assert args.messages == 3


def test_without_the_postgres_url_the_benchmark_exits_saying_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    monkeypatch.delenv("DIREDI_TEST_POSTGRES_URL", raising=False)

    # Execute
    with pytest.raises(SystemExit) as exit_info:
        harness.postgres_url()

    # Assert
    assert exit_info.value.code == "set DIREDI_TEST_POSTGRES_URL (scripts/services.sh postgres prints it)"


def test_the_postgres_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("DIREDI_TEST_POSTGRES_URL", "postgresql://bench@127.0.0.1:5432/postgres")

    # Execute, Assert
    assert harness.postgres_url() == "postgresql://bench@127.0.0.1:5432/postgres"


def test_write_results_writes_indented_json_with_a_trailing_newline_and_says_where(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "results" / "bench.json"
    console = Console(record=True, width=400)

    # Execute
    harness.write_results({"rate": 1.5, "where": tmp_path}, out, console)

    # Assert: the directory made, values JSON lacks written as text
    text = out.read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == {"rate": 1.5, "where": str(tmp_path)}
    assert text.startswith('{\n  "rate"')
    assert f"written to {out}" in console.export_text()


def test_machine_names_cpus_python_platform_and_commit() -> None:
    # Execute
    machine = harness.machine()

    # Assert
    assert set(machine) == {"cpus", "python", "platform", "commit"}
    assert machine["cpus"] >= 1
    assert machine["python"].count(".") == 2
    assert machine["commit"] is None or len(machine["commit"]) == 40


def test_machine_keys_put_cpus_and_python_at_a_reports_top_as_well() -> None:
    # Execute
    keys = harness.machine_keys()

    # Assert
    assert set(keys) == {"cpus", "python", "machine"}
    assert (keys["cpus"], keys["python"]) == (keys["machine"]["cpus"], keys["machine"]["python"])


def test_machine_without_git_has_no_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(shutil, "which", lambda _name: None)

    # Execute, Assert
    assert harness.machine()["commit"] is None


def test_a_table_aligns_its_label_columns_left_and_its_figures_right() -> None:
    # Execute
    table = harness.table("Figures", ("case", "note", "ms", "MB"), left=2)

    # Assert
    assert table.title == "Figures"
    assert [(c.header, c.justify) for c in table.columns] == [
        ("case", "left"),
        ("note", "left"),
        ("ms", "right"),
        ("MB", "right"),
    ]
