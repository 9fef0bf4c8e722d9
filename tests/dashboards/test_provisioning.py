"""The provisioning files parse and point Grafana at the datasource and folder the dashboards expect."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dashboards.promql import PROMETHEUS_TYPE, PROMETHEUS_UID
from dashboards.sqlquery import DATASOURCE_TYPE, DATASOURCE_UID

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "dashboards"
PROVISIONING = DASHBOARDS_DIR / "provisioning"
# Grafana expands $NAME and ${NAME} in provisioning files (no ${NAME:-default}).
ENV_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def load(relative: str) -> dict[str, Any]:
    """One provisioning file, parsed."""
    data: dict[str, Any] = yaml.safe_load((PROVISIONING / relative).read_text(encoding="utf-8"))
    return data


def env_names(value: str) -> list[str]:
    """The environment variables a provisioning value refers to."""
    return [a or b for a, b in ENV_REFERENCE.findall(value)]


def test_datasource_is_the_registry_from_the_environment() -> None:
    # Execute
    document = load("datasources/diredi.yaml")

    # Assert
    assert document["apiVersion"] == 1
    [source] = document["datasources"]
    assert (source["type"], source["uid"], source["access"]) == (DATASOURCE_TYPE, DATASOURCE_UID, "proxy")
    assert env_names(source["url"]) == ["DIREDI_PG_HOST", "DIREDI_PG_PORT"]
    assert env_names(source["user"]) == ["DIREDI_PG_USER"]
    settings = source["jsonData"]
    assert env_names(settings["database"]) == ["DIREDI_PG_DATABASE"]
    assert env_names(settings["sslmode"]) == ["DIREDI_PG_SSLMODE"]
    assert settings["postgresVersion"] == 1500
    assert settings["timescaledb"] is False


def test_password_is_a_secret_from_the_environment() -> None:
    [source] = load("datasources/diredi.yaml")["datasources"]

    assert env_names(source["secureJsonData"]["password"]) == ["DIREDI_PG_PASSWORD"]
    assert "password" not in source and "password" not in source["jsonData"]


def strings(node: Any) -> list[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return [node] if isinstance(node, str) else []


def test_every_environment_variable_is_documented() -> None:
    readme = (DASHBOARDS_DIR / "README.md").read_text(encoding="utf-8")

    names = {n for value in strings(load("datasources/diredi.yaml")) for n in env_names(value)}

    assert names == {f"DIREDI_PG_{n}" for n in ("HOST", "PORT", "USER", "PASSWORD", "DATABASE", "SSLMODE")}
    assert all(name in readme for name in names)


def test_prometheus_datasource_is_the_one_the_promql_panels_name() -> None:
    # Execute
    document = load("datasources/prometheus.yaml")

    # Assert
    assert document["apiVersion"] == 1
    [source] = document["datasources"]
    assert (source["type"], source["uid"], source["access"]) == (PROMETHEUS_TYPE, PROMETHEUS_UID, "proxy")
    assert env_names(source["url"]) == ["DIREDI_PROMETHEUS_URL"]
    assert source["isDefault"] is False  # the registry stays the default
    readme = (DASHBOARDS_DIR / "README.md").read_text(encoding="utf-8")
    assert "DIREDI_PROMETHEUS_URL" in readme


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    # Execute
    document = load("dashboards/diredi.yaml")

    # Assert
    assert document["apiVersion"] == 1
    [provider] = document["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/diredi"
    assert provider["allowUiUpdates"] is False and provider["disableDeletion"] is True
    assert provider["options"]["path"] in (DASHBOARDS_DIR / "README.md").read_text(encoding="utf-8")
