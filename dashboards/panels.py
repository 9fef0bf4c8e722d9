"""Panel helpers: each returns an SDK builder already bound to the registry datasource and its SQL."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from textwrap import dedent

from grafana_foundation_sdk.builders import bargauge, piechart, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import piechart as piechart_models

from dashboards.sqlquery import Format, SQLQueryBuilder, datasource

TAG = "diredi"
States = Iterable[enum.Enum]

# One colour per state name, so a state looks the same on every panel (names shared by several enums
# of cloud/registry/tables.py, like `failed`, mean the same thing in each).
COLOURS = {
    "online": "green",
    "offline": "red",
    "approved": "green",
    "candidate": "blue",
    "rejected": "red",
    "received": "blue",
    "consumed": "green",
    "discarded": "orange",
    "running": "blue",
    "offered": "blue",
    "installed": "green",
    "succeeded": "green",
    "completed": "green",
    "failed": "red",
    "halted": "red",
    "cancelled": "orange",
    "rolled_back": "orange",
    "paused": "yellow",
    "stopped": "yellow",
}


def sql(text: str) -> str:
    """SQL as written in the dashboard modules, without its indentation."""
    return dedent(text).strip()


def count_of(alias: str, where: str, table: str = "device") -> str:
    """A one-row count, for stat panels (composed from constants at build time, never from input)."""
    return f'SELECT count(*) AS "{alias}" FROM {table} WHERE {where}'  # noqa: S608


def board(title: str, uid: str, description: str) -> db.Dashboard:
    """A dashboard with the settings every DiReDi dashboard shares, linked to the others by tag."""
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .timezone("browser")
        .time("now-6h", "now")
        .refresh("1m")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(
            db.DashboardLink("DiReDi")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .keep_time(True)
        )
    )


def _mappings(states: States) -> list[dm.ValueMapping]:
    options = {s.value: dm.ValueMappingResult(color=COLOURS.get(s.value, "text")) for s in states}
    return [dm.ValueMap(options=options)]


def _colour_series(panel: timeseries.Panel | piechart.Panel, states: States) -> None:
    # Long-format series and pie slices are named by the state, so an override by name fixes its colour.
    for s in states:
        colour = {"mode": "fixed", "fixedColor": COLOURS.get(s.value, "text")}
        panel.override_by_name(s.value, [dm.DynamicConfigValue(id_val="color", value=colour)])


def _reduce(
    calc: str = "lastNotNull", *, rows: bool = False, fields: str = ""
) -> common_builders.ReduceDataOptions:
    return common_builders.ReduceDataOptions().calcs([calc]).values(rows).fields(fields)


def stat_panel(
    title: str,
    query: str,
    *,
    unit: str = "short",
    w: int = 6,
    h: int = 4,
    description: str = "",
    text: bool = False,
    states: States = (),
) -> stat.Panel:
    """A single number (or, with `text`, a single string) from a one-row table query."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(datasource())
        .with_target(SQLQueryBuilder(query, "table"))
        .unit(unit)
        .span(w)
        .height(h)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.VALUE)
        .text_mode(common.BigValueTextMode.VALUE)
        .reduce_options(_reduce(fields="/.*/" if text else ""))
    )
    if states:
        panel.mappings(_mappings(states))
    return panel


def timeseries_panel(
    title: str,
    query: str,
    *,
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
    bars: bool = False,
    points: bool = False,
    states: States = (),
    max_value: float | None = None,
) -> timeseries.Panel:
    """A time series from a `time_series` query (a `time` column, ascending; `metric` names long series)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(datasource())
        .with_target(SQLQueryBuilder(query, "time_series"))
        .unit(unit)
        .span(w)
        .height(h)
        .min(0)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
        .fill_opacity(10)
        .span_nulls(True)
    )
    if bars:
        panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
        panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    elif points:
        panel.draw_style(common.GraphDrawStyle.POINTS).point_size(6)
    if max_value is not None:
        panel.max(max_value)
    _colour_series(panel, states)
    return panel


def table_panel(
    title: str,
    query: str,
    *,
    w: int = 12,
    h: int = 8,
    description: str = "",
    units: dict[str, str] | None = None,
    gauges: Iterable[str] = (),
    states: States = (),
) -> table.Panel:
    """A table; `units` sets a unit per column, `gauges` draws 0..1 columns as gauges."""
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(datasource())
        .with_target(SQLQueryBuilder(query, "table"))
        .span(w)
        .height(h)
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
    )
    if states:
        panel.mappings(_mappings(states))
    for column, unit in (units or {}).items():
        panel.override_by_name(column, [dm.DynamicConfigValue(id_val="unit", value=unit)])
    for column in gauges:
        gauge = {"type": "gauge", "mode": "basic"}
        panel.override_by_name(
            column,
            [
                dm.DynamicConfigValue(id_val="unit", value="percentunit"),
                dm.DynamicConfigValue(id_val="min", value=0),
                dm.DynamicConfigValue(id_val="max", value=1),
                dm.DynamicConfigValue(id_val="custom.cellOptions", value=gauge),
            ],
        )
    return panel


def pie_panel(
    title: str, query: str, *, w: int = 6, h: int = 8, description: str = "", states: States = ()
) -> piechart.Panel:
    """A pie of a two-column table query (label, count): one slice per row."""
    panel = (
        piechart.Panel()
        .title(title)
        .description(description)
        .datasource(datasource())
        .with_target(SQLQueryBuilder(query, "table"))
        .span(w)
        .height(h)
        .pie_type(piechart_models.PieChartType.DONUT)
        .reduce_options(_reduce(rows=True))
        .legend(
            piechart.PieChartLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.RIGHT)
            .values([piechart_models.PieChartLegendValues.VALUE])
        )
    )
    _colour_series(panel, states)
    return panel


def bars_panel(
    title: str,
    query: str,
    *,
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
    max_value: float | None = None,
    fmt: Format = "table",
) -> bargauge.Panel:
    """Horizontal bars, one per row of a (label, value) table query."""
    panel = (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(datasource())
        .with_target(SQLQueryBuilder(query, fmt))
        .unit(unit)
        .span(w)
        .height(h)
        .min(0)
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .reduce_options(_reduce(rows=True))
    )
    if max_value is not None:
        panel.max(max_value)
    return panel
