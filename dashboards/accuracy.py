"""Model accuracy: what devices measure of each model version, beside what the pipeline measured."""

# The panels' SQL is composed from constants in this module when the JSON is built; no input reaches it.
# ruff: noqa: S608

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from cloud.registry.tables import ModelStatus
from dashboards.panels import bars_panel, board, pie_panel, sql, table_panel, timeseries_panel


def metric(key: str) -> str:
    """A numeric key of `model.metrics` as a float; NULL where it is absent or not a number."""
    return f"CASE jsonb_typeof(metrics -> '{key}') WHEN 'number' THEN (metrics ->> '{key}')::float END"


def per_model(value: str, where: str = "") -> str:
    """A per-interval aggregate of telemetry, one series per model version."""
    extra = f" AND {where}" if where else ""
    return sql(f"""
        SELECT $__timeGroupAlias(at, $__interval), coalesce(model_id, 'unknown') AS "metric",
               {value} AS "value"
        FROM telemetry WHERE $__timeFilter(at){extra}
        GROUP BY 1, 2 ORDER BY 1
    """)


def model_accuracy() -> db.Dashboard:
    """Accuracy per model version (uid diredi-model-accuracy)."""
    return (
        board(
            "DiReDi · Model accuracy", "diredi-model-accuracy", "Accuracy and confidence per model version."
        )
        .with_panel(
            timeseries_panel(
                "Field accuracy per model version",
                per_model("avg(accuracy)", "accuracy IS NOT NULL"),
                unit="percentunit",
                max_value=1,
                description="Mean of the accuracy devices report on their users' labelled feedback.",
            )
        )
        .with_panel(
            timeseries_panel(
                "Mean confidence per model version",
                per_model("avg(mean_confidence)", "mean_confidence IS NOT NULL"),
                unit="percentunit",
                max_value=1,
            )
        )
        .with_panel(
            table_panel(
                "Model versions in the time range",
                sql("""
                    SELECT coalesce(t.model_id, 'unknown') AS "model", m.kind AS "kind",
                           m.version AS "version", m.status AS "status",
                           count(DISTINCT t.device_id) AS "devices", avg(t.accuracy) AS "accuracy",
                           avg(t.mean_confidence) AS "confidence", avg(t.latency_p95_ms) AS "p95 latency"
                    FROM telemetry t LEFT JOIN model m ON m.id = t.model_id
                    WHERE $__timeFilter(t.at)
                    GROUP BY 1, 2, 3, 4 ORDER BY 1
                """),
                w=16,
                units={"accuracy": "percentunit", "confidence": "percentunit", "p95 latency": "ms"},
                states=ModelStatus,
            )
        )
        .with_panel(
            pie_panel(
                "Models by status",
                'SELECT status AS "status", count(*) AS "models" FROM model GROUP BY status ORDER BY status',
                w=8,
                states=ModelStatus,
            )
        )
        .with_panel(
            table_panel(
                "Model metrics",
                sql(f"""
                    SELECT id AS "model", cohort_id AS "cohort", kind AS "kind", version AS "version",
                           status AS "status", {metric("int8_acc")} AS "int8 acc",
                           {metric("float_acc")} AS "float acc",
                           coalesce(metrics -> 'gate' ->> 'outcome', metrics ->> 'gate') AS "gate",
                           size AS "size", created_at AS "created"
                    FROM model ORDER BY cohort_id, kind, version DESC
                """),
                w=16,
                units={"int8 acc": "percentunit", "float acc": "percentunit", "size": "bytes"},
                states=ModelStatus,
                description="From each model's metrics: int8_acc, float_acc and the gate's outcome.",
            )
        )
        .with_panel(
            bars_panel(
                "Edge int8 accuracy by version",
                sql(f"""
                    SELECT cohort_id || ' v' || version AS "model", {metric("int8_acc")} AS "int8 acc"
                    FROM model WHERE kind = 'edge' AND jsonb_typeof(metrics -> 'int8_acc') = 'number'
                    ORDER BY cohort_id, version
                """),
                w=8,
                unit="percentunit",
                max_value=1,
            )
        )
        .with_panel(
            timeseries_panel(
                "Devices per model version", per_model("count(DISTINCT device_id)"), w=24, bars=True
            )
        )
    )
