"""A real Prometheus scrapes a running API, ingest and worker with deploy/prometheus's configuration:
every target comes up, each job's metrics can be queried, the alert rules load, and every PromQL panel
of the service-health dashboard runs without error.

The system runs on mosquitto, PostgreSQL and Redis of the test's own (as tests/cloud/test_localsystem.py
runs it); Prometheus is Debian's binary (`scripts/services.sh prometheus`) on a free loopback port,
scraping every second. Without the binary the test is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess  # noqa: S404 (prometheus, fixed argument lists)
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import SecretStr, ValidationError

from cloud.children import free_ports
from cloud.localsystem import LocalSystem
from cloud.registry.tables import Role
from cloud.settings import Settings
from dashboards.build import JSON_DIR
from dashboards.promql import PROMETHEUS_UID
from dashboards.validate import walk
from tests.brokers import running_mosquitto
from tests.databases import postgres_admin_url
from tests.polling import wait_until
from tests.redis_server import running_redis
from testsupport.postgres import scratch_database

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
UP_TIMEOUT = 60.0
READY_TIMEOUT = 120.0  # the API, ingest and worker start on a machine shared with other tests
# What Grafana puts in place of its interval variables, for a one-second scrape over a short range.
GRAFANA_INTERVALS = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "1m"}


@dataclass(frozen=True)
class Scraped:
    """The running system and the Prometheus scraping it."""

    system: LocalSystem
    prometheus: str  # its base URL
    log: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """One call of Prometheus's HTTP API; its `data`, or a failure showing the error."""
        response = httpx.get(f"{self.prometheus}{path}", params=params, timeout=10)
        body: dict[str, Any] = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body


def prometheus_binary() -> str:
    """Debian's prometheus, or a skip saying how to install it."""
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        pytest.skip("prometheus is not installed: run scripts/services.sh prometheus (Debian's prometheus)")
    return found


def scrape_config(system: LocalSystem, key_file: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml pointed at `system`, scraping and evaluating every second."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    targets = {
        "diredi-api": f"127.0.0.1:{system.api_port}",
        "diredi-ingest": f"{system.settings.metrics_host}:{system.metrics_ports['ingest']}",
        "diredi-worker": f"{system.settings.metrics_host}:{system.metrics_ports['worker']}",
    }
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(key_file)
    return config


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """The API, ingest and worker running, and a Prometheus scraping them (all targets up)."""
    binary = prometheus_binary()
    tmp = tmp_path_factory.mktemp("scrape")
    with (
        running_mosquitto(tmp / "mosquitto") as broker,
        scratch_database(postgres_admin_url(), prefix="diredi_scrape") as database_url,
        running_redis(tmp / "redis") as redis_url,
    ):
        api_port, ingest_metrics, worker_metrics, prometheus_port = free_ports(4)
        settings = Settings(
            data_dir=tmp / "data",
            mqtt_url=SecretStr(broker.cloud.url()),
            mqtt_admin_url=SecretStr(broker.admin.url()),
            database_url=database_url,
            redis_url=redis_url,
            ingest_metrics_port=ingest_metrics,
            worker_metrics_port=worker_metrics,
            metrics_host="127.0.0.1",
        )
        with LocalSystem(settings, api_port=api_port, ready_timeout=READY_TIMEOUT) as system:
            key_file = tmp / "viewer.key"
            key_file.write_text(system.create_api_key(Role.viewer, name="prometheus") + "\n")
            key_file.chmod(0o600)
            config = tmp / "prometheus.yml"
            config.write_text(yaml.safe_dump(scrape_config(system, key_file)))
            log = tmp / "prometheus.log"
            with log.open("wb") as output:
                process = subprocess.Popen(  # noqa: S603
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    ],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            try:
                yield Scraped(system, f"http://127.0.0.1:{prometheus_port}", log)
            finally:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def targets(scraped: Scraped) -> dict[str, str]:
    """Each active target's job and its health (up, down or unknown); {} until Prometheus answers."""
    try:
        data = scraped.api("/api/v1/targets")["data"]
    except (httpx.HTTPError, json.JSONDecodeError):
        return {}
    return {t["labels"]["job"]: t["health"] for t in data["activeTargets"]}


def test_every_target_comes_up(scraped: Scraped) -> None:
    # Execute
    wait_until(
        lambda: targets(scraped) and set(targets(scraped).values()) == {"up"},
        UP_TIMEOUT,
        lambda: f"targets {targets(scraped)}; prometheus log:\n{scraped.log.read_text()[-3000:]}",
    )

    # Assert
    assert set(targets(scraped)) == {"diredi-api", "diredi-ingest", "diredi-worker"}


def instant(scraped: Scraped, query: str) -> list[dict[str, Any]]:
    """The samples of an instant query."""
    result: list[dict[str, Any]] = scraped.api("/api/v1/query", query=query)["data"]["result"]
    return result


@pytest.mark.parametrize(
    ("job", "query", "expected"),
    [
        ("diredi-api", "diredi_registry_scrape_ok", 1.0),  # the API read the fleet from the registry
        ("diredi-ingest", "diredi_ingest_connected", 1.0),
        ("diredi-worker", "diredi_worker_jobs_requeued_total", 0.0),
    ],
)
def test_each_job_has_its_metrics(scraped: Scraped, job: str, query: str, expected: float) -> None:
    # Prepare
    test_every_target_comes_up(scraped)

    # Execute
    samples = wait_until(lambda: instant(scraped, f'{query}{{job="{job}"}}'), UP_TIMEOUT, f"no {query}")

    # Assert
    [sample] = samples
    assert float(sample["value"][1]) == expected


def test_the_api_counts_the_scrapes_it_answered(scraped: Scraped) -> None:
    test_every_target_comes_up(scraped)

    answered = wait_until(
        lambda: instant(
            scraped, 'diredi_api_requests_total{job="diredi-api", route="/metrics", status="200"}'
        ),
        UP_TIMEOUT,
        "no scrape of the API counted",
    )

    assert float(answered[0]["value"][1]) >= 1


def rule_health(scraped: Scraped) -> dict[str, str]:
    """Each rule's name and health, once every rule has been evaluated at least once."""
    groups = scraped.api("/api/v1/rules")["data"]["groups"]
    return {r["name"]: r["health"] for g in groups for r in g["rules"] if r["health"] != "unknown"}


def test_the_alert_rules_load_and_evaluate(scraped: Scraped) -> None:
    # Prepare
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    names = {r.get("alert") or r["record"] for g in rules["groups"] for r in g["rules"]}

    # Execute
    def evaluated() -> dict[str, str]:
        health = rule_health(scraped)
        return health if len(health) == len(names) else {}

    health = wait_until(evaluated, 30, "not every rule was evaluated")

    # Assert
    assert set(health) == names
    assert set(health.values()) == {"ok"}, health


def promql_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every Prometheus target of every dashboard."""
    return [
        (str(panel["title"]), str(target["expr"]))
        for path in sorted(JSON_DIR.glob("*.json"))
        for panel in walk(json.loads(path.read_text(encoding="utf-8"))["panels"])
        if (panel.get("datasource") or {}).get("uid") == PROMETHEUS_UID
        for target in panel.get("targets") or []
    ]


def grafana_expanded(expr: str) -> str:
    """`expr` with Grafana's interval variables replaced as Grafana would for this scrape interval."""
    for name, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, value)
    assert not re.search(r"\$\w", expr), expr
    return expr


def test_the_dashboards_have_promql_panels() -> None:
    assert len(promql_queries()) >= 15


@pytest.mark.parametrize(
    ("panel", "expr"), promql_queries(), ids=[f"{t}/{e[:40]}" for t, e in promql_queries()]
)
def test_promql_panel_runs(scraped: Scraped, panel: str, expr: str) -> None:
    # Prepare
    test_every_target_comes_up(scraped)
    end = time.time()

    # Execute
    data = scraped.api(
        "/api/v1/query_range", query=grafana_expanded(expr), start=str(end - 60), end=str(end), step="1"
    )["data"]

    # Assert
    assert data["resultType"] == "matrix", (panel, data)


def test_metrics_host_is_an_address() -> None:
    assert Settings(metrics_host="0.0.0.0").metrics_host == "0.0.0.0"  # noqa: S104 (a value under test)
    assert Settings(metrics_host="::").metrics_host == "::"
    assert Settings().metrics_host == "127.0.0.1"
    with pytest.raises(ValidationError, match="metrics_host must be an IPv4 or IPv6 address"):
        Settings(metrics_host="metrics.example")
