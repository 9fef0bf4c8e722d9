"""PromQL panels on the provisioned Prometheus datasource (uid diredi-prom): the services' own metrics."""

from __future__ import annotations

from typing import TypeVar

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as prometheus_models

PROMETHEUS_TYPE = "prometheus"
PROMETHEUS_UID = "diredi-prom"
Queries = list[tuple[str, str]]  # (PromQL, legend)
P = TypeVar("P", timeseries.Panel, stat.Panel)


def prometheus_datasource() -> dm.DataSourceRef:
    """The provisioned Prometheus (dashboards/provisioning/datasources/prometheus.yaml)."""
    return dm.DataSourceRef(type_val=PROMETHEUS_TYPE, uid=PROMETHEUS_UID)


def promql(expr: str, legend: str = "", ref_id: str = "A") -> prometheus.Dataquery:
    """A range query in code mode; `legend` names the series (Grafana's `{{label}}` templates)."""
    query = (
        prometheus.Dataquery()
        .expr(expr)
        .range()
        .editor_mode(prometheus_models.QueryEditorMode.CODE)
        .datasource(prometheus_datasource())
        .ref_id(ref_id)
    )
    return query.legend_format(legend) if legend else query


def _with_targets(panel: P, queries: Queries) -> P:
    for number, (expr, legend) in enumerate(queries):
        panel.with_target(promql(expr, legend, chr(ord("A") + number)))
    return panel


def prom_timeseries_panel(
    title: str,
    queries: Queries,
    *,
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
    max_value: float | None = None,
) -> timeseries.Panel:
    """A time series of one or more PromQL queries."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(prometheus_datasource())
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
    )
    if max_value is not None:
        panel.max(max_value)
    return _with_targets(panel, queries)


def prom_stat_panel(
    title: str, queries: Queries, *, unit: str = "short", w: int = 4, h: int = 4, description: str = ""
) -> stat.Panel:
    """The latest value of each query, with its trend."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(prometheus_datasource())
        .unit(unit)
        .span(w)
        .height(h)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    return _with_targets(panel, queries)
