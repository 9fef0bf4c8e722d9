"""Every panel's SQL, expanded as Grafana expands it, runs on a migrated PostgreSQL and returns rows.

The panels are enumerated from the committed JSON (rows' nested panels included), so a new panel is
tested as soon as it is built. The database is this module's own, created, migrated, filled with a small
fleet (tests/dashboards/seed.py) and dropped here, so no other test shares or empties it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cloud.registry import migrate
from cloud.registry.db import make_engine
from dashboards.build import DASHBOARDS, JSON_DIR
from dashboards.sqlquery import DATASOURCE_UID
from dashboards.validate import walk
from tests.dashboards.grafana_macros import TimeRange, Variable, interpolate
from tests.dashboards.seed import seed
from tests.databases import postgres_admin_url
from testsupport.postgres import scratch_database

RANGE = timedelta(hours=6)  # the dashboards' default time range, now-6h to now
INTERVAL = timedelta(minutes=1)  # $__interval for a ~360 px wide panel over 6 hours
LEFTOVER = re.compile(r"\$\{?\w|\[\[\w")  # a macro or variable Grafana would have replaced


@dataclass(frozen=True)
class Query:
    """One SQL query of a dashboard: a panel target, or a template variable's query."""

    dashboard: str
    panel: str
    ref_id: str
    sql: str
    format: str

    @property
    def name(self) -> str:
        return f"{self.dashboard.removesuffix('.json')}/{self.panel}/{self.ref_id}"


def load(name: str) -> dict[str, Any]:
    """One committed dashboard."""
    data: dict[str, Any] = json.loads((JSON_DIR / name).read_text(encoding="utf-8"))
    return data


def sql_panels(name: str) -> list[dict[str, Any]]:
    """The panels of one dashboard on the registry datasource (rows' nested ones included)."""
    return [
        panel
        for panel in walk(load(name)["panels"])
        if panel.get("type") != "row" and (panel.get("datasource") or {}).get("uid") == DATASOURCE_UID
    ]


def panel_queries() -> list[Query]:
    """Every target of every registry panel of every dashboard (PromQL: tests/deploy/test_scrape.py)."""
    return [
        Query(
            name,
            str(panel.get("title")),
            str(target.get("refId")),
            str(target.get("rawSql")),
            target.get("format"),
        )
        for name in sorted(DASHBOARDS)
        for panel in sql_panels(name)
        for target in panel.get("targets") or []
    ]


def query_variables(name: str) -> list[dict[str, Any]]:
    """The query variables of one dashboard, in their order (Grafana resolves them in that order)."""
    return [v for v in load(name).get("templating", {}).get("list", []) if v["type"] == "query"]


def variable_queries(name: str) -> list[Query]:
    """The SQL of each query variable of one dashboard."""
    return [Query(name, f"${v['name']}", v["name"], v["query"], "table") for v in query_variables(name)]


def loaded(variable: dict[str, Any], values: list[str]) -> Variable:
    """The variable as Grafana sets it on load: All (every value) when it offers All, else the first."""
    multi, include_all = bool(variable.get("multi")), bool(variable.get("includeAll"))
    if include_all:
        return Variable(values, multi=multi, include_all=True)
    return Variable([values[0]] if multi else values[0], multi=multi)


def test_every_registry_panel_has_a_target_with_sql() -> None:
    # Execute
    panels = [p for name in DASHBOARDS for p in sql_panels(name)]

    # Assert
    assert len(panels) >= 40
    for panel in panels:
        assert panel.get("targets"), panel.get("title")
        assert all(isinstance(t.get("rawSql"), str) and t["rawSql"].strip() for t in panel["targets"])
    assert len(panel_queries()) == sum(len(p["targets"]) for p in panels)


@pytest.fixture(scope="module")
def database() -> Iterator[Engine]:
    """A PostgreSQL database of this module's own, migrated and seeded; dropped afterwards."""
    with scratch_database(postgres_admin_url(), prefix="diredi_dash") as url:
        engine = make_engine(url, pool_size=2)
        try:
            migrate.upgrade(engine)
            with Session(engine) as session:
                seed(session, datetime.now(UTC))
            yield engine
        finally:
            engine.dispose()


def run(engine: Engine, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run `sql` as the datasource's read-only role would: in a read-only transaction, rolled back."""
    with engine.connect() as connection:
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
        connection.exec_driver_sql("SET LOCAL statement_timeout = '10s'")
        result = connection.exec_driver_sql(sql)
        return list(result.keys()), [tuple(row) for row in result.all()]


def time_range() -> TimeRange:
    """The dashboards' default range, ending now."""
    now = datetime.now(UTC)
    return TimeRange(now - RANGE, now)


@pytest.fixture(scope="module")
def variables(database: Engine) -> dict[str, dict[str, Variable]]:
    """Each dashboard's variables set as Grafana sets them on load: to the first value of their query."""
    values: dict[str, dict[str, Variable]] = {}
    for name in DASHBOARDS:
        values[name] = {}
        for variable, query in zip(query_variables(name), variable_queries(name), strict=True):
            _, rows = run(database, interpolate(query.sql, time_range(), INTERVAL, values[name]))
            assert rows, f"{query.name} has no values"
            values[name][query.ref_id] = loaded(variable, [str(row[0]) for row in rows])
    return values


def test_the_device_variable_lists_every_device(database: Engine) -> None:
    [query] = variable_queries("device-telemetry.json")

    _, rows = run(database, interpolate(query.sql, time_range(), INTERVAL))

    assert [r[0] for r in rows] == ["cam-01", "cam-02", "cam-03", "cam-04", "cam-99"]


def test_the_cohort_variable_filters_the_fleet_panels(database: Engine) -> None:
    # Prepare
    [devices] = [q for q in panel_queries() if q.dashboard == "fleet-overview.json" and q.panel == "Devices"]
    [cohort] = query_variables("fleet-overview.json")
    everything = loaded(cohort, ["kitchen"])
    elsewhere = Variable(["nowhere"], multi=True)

    # Execute
    counts = [
        run(database, interpolate(devices.sql, time_range(), INTERVAL, {"cohort": chosen}))[1][0][0]
        for chosen in (everything, elsewhere)
    ]

    # Assert
    assert cohort["multi"] is True and cohort["includeAll"] is True
    assert counts[0] > 0
    assert counts[1] == 0
    fleet = [q for q in panel_queries() if q.dashboard == "fleet-overview.json"]
    assert all("$cohort" in q.sql for q in fleet), [q.panel for q in fleet if "$cohort" not in q.sql]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


@pytest.mark.parametrize("query", panel_queries(), ids=lambda q: q.name)
def test_panel_sql_runs_and_returns_rows(
    database: Engine, variables: dict[str, dict[str, Variable]], query: Query
) -> None:
    # Prepare
    sql = interpolate(query.sql, time_range(), INTERVAL, variables[query.dashboard])
    assert not LEFTOVER.search(sql), sql

    # Execute
    columns, rows = run(database, sql)

    # Assert
    assert rows, f"no rows from:\n{sql}"
    if query.format == "time_series":
        # Grafana needs a `time` column, ascending, and at least one numeric value column.
        assert "time" in columns, columns
        times = [row[columns.index("time")] for row in rows]
        assert None not in times and times == sorted(times)
        values = [i for i, c in enumerate(columns) if c != "time"]
        assert any(_is_number(row[i]) for row in rows for i in values), columns
    else:
        assert query.format == "table"
