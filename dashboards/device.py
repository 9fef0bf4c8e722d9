"""Device telemetry: one device, picked by the `device` variable, and its status messages over time."""

# The panels' SQL is composed from constants in this module when the JSON is built; no input reaches it.
# ruff: noqa: S608

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import dashboard as dm

from cloud.registry.tables import KnowledgeStatus, Presence
from dashboards.panels import bars_panel, board, count_of, sql, stat_panel, table_panel, timeseries_panel
from dashboards.sqlquery import datasource

DEVICE = "id = '$device'"


def series(columns: str) -> str:
    """Per-interval aggregates of the selected device's telemetry."""
    return sql(f"""
        SELECT $__timeGroupAlias(at, $__interval), {columns}
        FROM telemetry WHERE device_id = '$device' AND $__timeFilter(at)
        GROUP BY 1 ORDER BY 1
    """)


def field(column: str, alias: str) -> str:
    """One column of the selected device's registry row."""
    return f"SELECT {column} AS \"{alias}\" FROM device WHERE id = '${{device}}'"


def device_telemetry() -> db.Dashboard:
    """Per-device telemetry (uid diredi-device-telemetry)."""
    return (
        board(
            "DiReDi · Device telemetry",
            "diredi-device-telemetry",
            "One device's presence and status messages.",
        )
        .with_variable(
            db.QueryVariable("device")
            .label("Device")
            .datasource(datasource())
            .query("SELECT id FROM device ORDER BY id")
            .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
            .sort(dm.VariableSort.DISABLED)
        )
        .with_panel(stat_panel("Presence", field("presence", "presence"), w=4, text=True, states=Presence))
        .with_panel(
            stat_panel(
                "Last seen",
                field("extract(epoch FROM last_seen) * 1000", "last seen"),
                w=4,
                unit="dateTimeFromNow",
            )
        )
        .with_panel(
            stat_panel(
                "Reported model", field("coalesce(reported_model_id, '(none)')", "reported"), w=5, text=True
            )
        )
        .with_panel(
            stat_panel(
                "Desired model", field("coalesce(desired_model_id, '(none)')", "desired"), w=5, text=True
            )
        )
        .with_panel(
            stat_panel(
                "Uptime",
                sql("""
                    SELECT uptime_s AS "uptime" FROM telemetry
                    WHERE device_id = '$device' AND uptime_s IS NOT NULL AND at <= $__timeTo()
                    ORDER BY at DESC LIMIT 1
                """),
                w=3,
                unit="s",
            )
        )
        .with_panel(
            stat_panel(
                "Messages",
                count_of(
                    "messages",
                    "device_id = '$device' AND at BETWEEN $__timeFrom() AND $__timeTo()",
                    "telemetry",
                ),
                w=3,
                description="Status messages in the time range.",
            )
        )
        .with_panel(
            timeseries_panel(
                "Latency",
                series('avg(latency_p50_ms) AS "p50", max(latency_p95_ms) AS "p95"'),
                unit="ms",
                description="p50 is averaged over each interval, p95 is the interval's worst value.",
            )
        )
        .with_panel(
            timeseries_panel(
                "Inference rate",
                sql("""
                    SELECT $__timeGroupAlias(at, $__interval),
                           sum(delta) / nullif(sum(dt), 0) AS "inferences/s"
                    FROM (
                        SELECT at, inference_count - lag(inference_count) OVER w AS delta,
                               extract(epoch FROM at - lag(at) OVER w) AS dt
                        FROM telemetry
                        WHERE device_id = '$device' AND inference_count IS NOT NULL AND $__timeFilter(at)
                        WINDOW w AS (ORDER BY at)
                    ) AS steps
                    WHERE delta >= 0
                    GROUP BY 1 ORDER BY 1
                """),
                unit="ops",
                description="From the inference counter; a step where it went down (a restart) is skipped.",
            )
        )
        .with_panel(
            timeseries_panel(
                "Mean confidence",
                series('avg(mean_confidence) AS "mean confidence"'),
                unit="percentunit",
                max_value=1,
            )
        )
        .with_panel(
            timeseries_panel(
                "Accuracy", series('avg(accuracy) AS "accuracy"'), unit="percentunit", max_value=1
            )
        )
        .with_panel(timeseries_panel("CPU", series('avg(cpu_percent) AS "cpu"'), w=8, unit="percent"))
        .with_panel(timeseries_panel("Memory", series('avg(mem_bytes) AS "memory"'), w=8, unit="bytes"))
        .with_panel(
            timeseries_panel("Temperature", series('avg(temp_c) AS "temperature"'), w=8, unit="celsius")
        )
        .with_panel(
            bars_panel(
                "Class histogram (latest status)",
                sql("""
                    SELECT h.key AS "class", (h.value #>> '{}')::float AS "count"
                    FROM (
                        SELECT class_histogram FROM telemetry
                        WHERE device_id = '$device' AND json_typeof(class_histogram) = 'object'
                              AND at <= $__timeTo()
                        ORDER BY at DESC LIMIT 1
                    ) AS latest, json_each(latest.class_histogram) AS h
                    WHERE json_typeof(h.value) = 'number'
                    ORDER BY length(h.key), h.key
                """),
                description="Predictions per class in the device's latest status message.",
            )
        )
        .with_panel(
            table_panel(
                "Knowledge reports",
                sql("""
                    SELECT received_at AS "received", base_model_id AS "base model",
                           sample_count AS "samples", size_bytes AS "bytes", dp_epsilon AS "dp epsilon",
                           status AS "status", status_reason AS "reason"
                    FROM knowledge_report WHERE device_id = '$device' AND $__timeFilter(received_at)
                    ORDER BY received_at DESC LIMIT 20
                """),
                units={"bytes": "bytes"},
                states=KnowledgeStatus,
            )
        )
        .with_row(
            db.Row("Status messages")
            .collapsed(True)
            .with_panel(
                table_panel(
                    "Latest status messages",
                    sql("""
                        SELECT at AS "time", model_id AS "model", inference_count AS "inferences",
                               latency_p50_ms AS "p50", latency_p95_ms AS "p95",
                               mean_confidence AS "confidence", labelled_count AS "labelled",
                               accuracy AS "accuracy", cpu_percent AS "cpu", mem_bytes AS "memory",
                               temp_c AS "temperature"
                        FROM telemetry WHERE device_id = '${device}' AND $__timeFilter(at)
                        ORDER BY at DESC LIMIT 100
                    """),
                    w=24,
                    h=10,
                    units={
                        "p50": "ms",
                        "p95": "ms",
                        "confidence": "percentunit",
                        "accuracy": "percentunit",
                        "cpu": "percent",
                        "memory": "bytes",
                        "temperature": "celsius",
                    },
                )
            )
        )
    )
