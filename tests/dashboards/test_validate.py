"""The dashboards are valid for Grafana provisioning and match their builder; broken ones are rejected."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dashboards import build
from dashboards.validate import main, validate, walk

Breakage = Callable[[dict[str, Any]], None]


def load(name: str) -> dict[str, Any]:
    """One committed dashboard."""
    data: dict[str, Any] = json.loads((build.JSON_DIR / name).read_text(encoding="utf-8"))
    return data


def panel(data: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """A top-level panel of a dashboard."""
    found: dict[str, Any] = data["panels"][index]
    return found


def first_row(data: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's first row panel."""
    return next(p for p in data["panels"] if p["type"] == "row")


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_committed_dashboard_is_valid(name: str) -> None:
    assert validate(load(name)) == []


def test_committed_json_is_what_the_builder_writes() -> None:
    assert build.stale() == [], "run: python -m dashboards.build"


def test_every_json_file_comes_from_the_builder() -> None:
    assert {p.name for p in build.JSON_DIR.glob("*.json")} == set(build.DASHBOARDS)


def test_dashboards_have_distinct_uids_and_titles() -> None:
    dashboards = [load(name) for name in build.DASHBOARDS]
    assert len({d["uid"] for d in dashboards}) == len({d["title"] for d in dashboards}) == len(dashboards)


def test_rows_nest_panels_so_the_walk_sees_them() -> None:
    data = load("knowledge-jobs.json")
    row = first_row(data)

    titles = [p.get("title") for p in walk(data["panels"])]

    assert row["collapsed"] is True and row["panels"]
    assert all(p["title"] in titles for p in row["panels"])


def _set(path: list[str | int], value: Any) -> Breakage:
    def breakage(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return breakage


def _drop(path: list[str | int]) -> Breakage:
    def breakage(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return breakage


def _rename_grid(data: dict[str, Any]) -> None:
    panel(data)["gridpos"] = panel(data).pop("gridPos")


def _overlap(data: dict[str, Any]) -> None:
    panel(data, 1)["gridPos"] = dict(panel(data)["gridPos"])


def _expand_row(data: dict[str, Any]) -> None:
    first_row(data)["collapsed"] = False


def _duplicate_ref(data: dict[str, Any]) -> None:
    panel(data)["targets"].append(dict(panel(data)["targets"][0]))


def _nested_without_datasource(data: dict[str, Any]) -> None:
    del first_row(data)["panels"][0]["datasource"]


BROKEN: dict[str, tuple[Breakage, str]] = {
    "unknown panel type": (_set(["panels", 0, "type"], "statt"), "unknown panel type 'statt'"),
    "panel without datasource": (_drop(["panels", 0, "datasource"]), "the panel's datasource must be"),
    "target on another datasource": (
        _set(["panels", 0, "targets", 0, "datasource"], {"type": "prometheus", "uid": "prom"}),
        "target A: its datasource must be",
    ),
    "nested panel without datasource": (_nested_without_datasource, "the panel's datasource must be"),
    "no targets": (_set(["panels", 0, "targets"], []), "at least one target"),
    "empty SQL": (_set(["panels", 0, "targets", 0, "rawSql"], "  "), "rawSql is empty"),
    "builder-mode query": (_set(["panels", 0, "targets", 0, "editorMode"], "builder"), "rawQuery true"),
    "bad format": (
        _set(["panels", 0, "targets", 0, "format"], "timeseries"),
        "format: 'timeseries' is not one of",
    ),
    "height as a string": (_set(["panels", 0, "gridPos", "h"], "4"), "grid_pos.h: '4' is not int"),
    "past the 24 columns": (_set(["panels", 0, "gridPos", "x"], 22), "runs past the grid's 24 columns"),
    "zero width": (_set(["panels", 0, "gridPos", "w"], 0), "an empty size"),
    "overlapping panels": (_overlap, "overlap"),
    "misspelt key": (_rename_grid, "gridpos: not a field of this Grafana type"),
    "unknown option": (_set(["panels", 0, "options", "colour"], "red"), "options.colour: not a field"),
    "bad option value": (
        _set(["panels", 0, "options", "graphMode"], "bogus"),
        "graph_mode: 'bogus' is not one of",
    ),
    "options null": (_set(["panels", 0, "options"], None), "does not decode as a Grafana dashboard"),
    "duplicate panel id": (_set(["panels", 1, "id"], 1), "panel ids must be unique"),
    "duplicate refId": (_duplicate_ref, "every target needs its own refId"),
    "undefined variable": (
        _set(["panels", 0, "targets", 0, "rawSql"], "SELECT count(*) FROM device WHERE id = '$devcie'"),
        "$devcie is not a template variable",
    ),
    "expanded row hiding panels": (_expand_row, "an expanded row must not nest panels"),
    "uid too long": (_set(["uid"], "x" * 41), "$.uid"),
    "bad tooltip mode": (_set(["graphTooltip"], 5), "graph_tooltip: 5 is not one of"),
    "no panels": (_set(["panels"], []), "the dashboard has no panels"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_a_broken_dashboard_is_rejected(breakage: str) -> None:
    # Prepare
    data = load("knowledge-jobs.json")
    assert validate(data) == []
    mutate, expected = BROKEN[breakage]
    mutate(data)

    # Execute
    errors = validate(data)

    # Assert
    assert any(expected in e for e in errors), errors


PROMQL_TARGET: list[str | int] = ["panels", 0, "targets", 0]
BROKEN_PROMQL: dict[str, tuple[Breakage, str]] = {
    "empty PromQL": (_set([*PROMQL_TARGET, "expr"], " "), "target A: expr is empty"),
    "PromQL target on the registry": (
        _set([*PROMQL_TARGET, "datasource"], {"type": "grafana-postgresql-datasource", "uid": "diredi-pg"}),
        "target A: its datasource must be the panel's",
    ),
    "instant PromQL": (_set([*PROMQL_TARGET, "range"], False), "PromQL needs range true"),
    "undefined variable in PromQL": (
        _set([*PROMQL_TARGET, "expr"], 'up{job="$jbo"}'),
        "$jbo is not a template variable",
    ),
    "another Prometheus": (
        _set(["panels", 0, "datasource"], {"type": "prometheus", "uid": "prom"}),
        "the panel's datasource must be",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN_PROMQL))
def test_a_broken_promql_panel_is_rejected(breakage: str) -> None:
    # Prepare
    data = load("service-health.json")
    assert validate(data) == []
    mutate, expected = BROKEN_PROMQL[breakage]
    mutate(data)

    # Execute
    errors = validate(data)

    # Assert
    assert any(expected in e for e in errors), errors


def test_the_command_line_fails_on_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(load("fleet-overview.json")))
    broken = load("fleet-overview.json")
    panel(broken)["type"] = "graph-v0"
    bad.write_text(json.dumps(broken))

    # Execute
    codes = main([str(good)]), main([str(good), str(bad)])

    # Assert
    assert codes == (0, 1)
    assert "unknown panel type 'graph-v0'" in capsys.readouterr().err


def test_a_list_is_not_a_dashboard() -> None:
    assert validate([]) == ["a dashboard is a JSON object"]
