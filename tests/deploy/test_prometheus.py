"""deploy/prometheus: promtool accepts the configuration and the rules, and the rules' unit tests pass,
with every alert firing in one of them at least.

promtool comes with Debian's `prometheus` package (`scripts/services.sh prometheus`); without it the
promtool tests are skipped.
"""

from __future__ import annotations

import shutil
import subprocess  # noqa: S404 (promtool, fixed argument lists)
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
JOBS = {"diredi-api", "diredi-ingest", "diredi-worker"}


def promtool() -> str:
    """The promtool binary, or a skip saying how to install it."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed: run scripts/services.sh prometheus (Debian's prometheus)")
    return found


def run_promtool(*args: str, cwd: Path) -> str:
    """promtool's output; fails the test, showing it, if promtool exits non-zero."""
    done = subprocess.run(  # noqa: S603
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def load(name: str) -> dict[str, Any]:
    """One file of deploy/prometheus, parsed."""
    data: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / name).read_text(encoding="utf-8"))
    return data


def alert_names() -> set[str]:
    """Every alert of alerts.yml."""
    return {
        rule["alert"] for group in load("alerts.yml")["groups"] for rule in group["rules"] if "alert" in rule
    }


@pytest.fixture
def deployed(tmp_path: Path) -> Path:
    """deploy/prometheus copied as an operator installs it: with the API key file it names."""
    directory = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, directory)
    key = directory / "secrets" / "diredi-api-viewer.key"
    key.parent.mkdir()
    key.write_text("a-viewer-key\n")
    key.chmod(0o600)
    return directory


def test_promtool_accepts_the_configuration_with_its_key_file(deployed: Path) -> None:
    output = run_promtool("check", "config", "prometheus.yml", cwd=deployed)

    assert "SUCCESS" in output
    assert "alerts.yml" in output  # the rule files it names were checked too


def test_promtool_refuses_the_configuration_without_the_key_file(deployed: Path) -> None:
    (deployed / "secrets" / "diredi-api-viewer.key").unlink()

    done = subprocess.run(  # noqa: S603
        [promtool(), "check", "config", "prometheus.yml"],
        cwd=deployed,
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode != 0
    assert "diredi-api-viewer.key" in done.stdout + done.stderr


def test_promtool_accepts_the_rules() -> None:
    output = run_promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)

    assert "SUCCESS" in output


def test_the_rules_unit_tests_pass() -> None:
    output = run_promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)

    assert "SUCCESS" in output


def test_every_alert_fires_in_a_unit_test_and_each_has_a_case_where_it_does_not() -> None:
    # Execute
    cases = [case for test in load("alerts_test.yml")["tests"] for case in test.get("alert_rule_test", [])]

    # Assert
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert fired == alert_names()
    assert quiet, "no case checks that an alert stays quiet"
    assert len(alert_names()) >= 12


def test_the_configuration_scrapes_each_service_and_the_api_with_a_key_from_a_file() -> None:
    # Execute
    config = load("prometheus.yml")

    # Assert
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == JOBS
    api = jobs["diredi-api"]
    assert api["metrics_path"] == "/metrics"
    assert api["authorization"]["type"] == "Bearer"
    assert "credentials" not in api["authorization"]  # the key is read from a file, never written here
    assert api["authorization"]["credentials_file"]
    assert config["rule_files"] == ["alerts.yml"]


def test_every_target_down_has_its_own_alert() -> None:
    rules = [rule for group in load("alerts.yml")["groups"] for rule in group["rules"] if "alert" in rule]

    down = {rule["expr"] for rule in rules if rule["expr"].startswith("up{")}

    assert down == {f'up{{job="{job}"}} == 0' for job in JOBS}
