"""Knowledge & jobs: reports coming in, the pipeline jobs they feed, and the models those jobs decide."""

# The panels' SQL is composed from constants in this module when the JSON is built; no input reaches it.
# ruff: noqa: S608

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from cloud.registry.tables import JobState, KnowledgeStatus, ModelStatus
from dashboards.panels import board, count_of, pie_panel, sql, stat_panel, table_panel, timeseries_panel

SECONDS = "extract(epoch FROM finished_at - started_at)"


def by_state(table: str, column: str, state: str = "status", where: str = "") -> str:
    """Counts per interval and state, as long series named by the state."""
    extra = f"{where} AND " if where else ""
    return sql(f"""
        SELECT $__timeGroupAlias({column}, $__interval), {state} AS "metric", count(*) AS "value"
        FROM {table} WHERE {extra}$__timeFilter({column})
        GROUP BY 1, 2 ORDER BY 1
    """)


def knowledge_and_jobs() -> db.Dashboard:
    """Knowledge flow and the pipeline (uid diredi-knowledge-jobs)."""
    return (
        board(
            "DiReDi · Knowledge & jobs", "diredi-knowledge-jobs", "Knowledge reports, pipeline jobs, models."
        )
        .with_panel(
            stat_panel(
                "Reports received", count_of("reports", "$__timeFilter(received_at)", "knowledge_report")
            )
        )
        .with_panel(
            stat_panel(
                "Reports waiting",
                count_of("waiting", "status = 'received'", "knowledge_report"),
                description="Stored by the ingest and not yet consumed or discarded by a job.",
            )
        )
        .with_panel(stat_panel("Jobs running", count_of("running", "state = 'running'", "job")))
        .with_panel(
            stat_panel(
                "Jobs failed", count_of("failed", "state = 'failed' AND $__timeFilter(created_at)", "job")
            )
        )
        .with_panel(
            timeseries_panel(
                "Knowledge reports received",
                sql("""
                    SELECT $__timeGroupAlias(received_at, $__interval), count(*) AS "reports",
                           sum(sample_count) AS "samples"
                    FROM knowledge_report WHERE $__timeFilter(received_at)
                    GROUP BY 1 ORDER BY 1
                """),
            )
        )
        .with_panel(
            timeseries_panel(
                "Knowledge reports by status",
                by_state("knowledge_report", "received_at"),
                bars=True,
                states=KnowledgeStatus,
            )
        )
        .with_panel(
            pie_panel(
                "Reports by status",
                sql("""
                    SELECT status AS "status", count(*) AS "reports"
                    FROM knowledge_report WHERE $__timeFilter(received_at)
                    GROUP BY status ORDER BY status
                """),
                states=KnowledgeStatus,
            )
        )
        .with_panel(
            table_panel(
                "Reports by device",
                sql("""
                    SELECT device_id AS "device", count(*) AS "reports", sum(sample_count) AS "samples",
                           sum(size_bytes) AS "bytes",
                           count(*) FILTER (WHERE status = 'consumed') AS "consumed",
                           count(*) FILTER (WHERE status = 'discarded') AS "discarded",
                           max(received_at) AS "last report"
                    FROM knowledge_report WHERE $__timeFilter(received_at)
                    GROUP BY device_id ORDER BY "reports" DESC, device_id LIMIT 100
                """),
                w=18,
                units={"bytes": "bytes"},
            )
        )
        .with_panel(
            timeseries_panel(
                "Jobs by state", by_state("job", "created_at", "state"), bars=True, states=JobState
            )
        )
        .with_panel(
            timeseries_panel(
                "Job durations",
                sql(f"""
                    SELECT finished_at AS "time", type AS "metric", {SECONDS} AS "value"
                    FROM job WHERE started_at IS NOT NULL AND $__timeFilter(finished_at)
                    ORDER BY 1
                """),
                unit="s",
                points=True,
                description="One point per finished job, at its finish time, one series per job type.",
            )
        )
        .with_panel(
            table_panel(
                "Running jobs",
                sql("""
                    SELECT id::text AS "job", type AS "type", cohort_id AS "cohort", stage AS "stage",
                           progress AS "progress", attempts AS "attempts", lease_owner AS "worker",
                           started_at AS "started", extract(epoch FROM now() - started_at) AS "running for"
                    FROM job WHERE state = 'running'
                    ORDER BY started_at
                """),
                w=16,
                units={"running for": "s"},
                gauges=["progress"],
            )
        )
        .with_panel(
            table_panel(
                "Job duration by type",
                sql(f"""
                    SELECT type AS "type", count(*) AS "jobs", avg({SECONDS}) AS "mean",
                           percentile_cont(0.95) WITHIN GROUP (ORDER BY {SECONDS}) AS "p95",
                           max({SECONDS}) AS "max"
                    FROM job
                    WHERE state = 'succeeded' AND started_at IS NOT NULL AND $__timeFilter(finished_at)
                    GROUP BY type ORDER BY type
                """),
                w=8,
                units={"mean": "s", "p95": "s", "max": "s"},
            )
        )
        .with_panel(
            timeseries_panel(
                "Models approved / rejected",
                by_state("model", "decided_at", where="status IN ('approved', 'rejected')"),
                bars=True,
                states=ModelStatus,
            )
        )
        .with_panel(
            table_panel(
                "Model decisions",
                sql("""
                    SELECT decided_at AS "decided", id AS "model", kind AS "kind", version AS "version",
                           status AS "status", status_reason AS "reason"
                    FROM model WHERE $__timeFilter(decided_at)
                    ORDER BY decided_at DESC LIMIT 50
                """),
                states=ModelStatus,
            )
        )
        .with_row(
            db.Row("Failures")
            .collapsed(True)
            .with_panel(
                table_panel(
                    "Failed jobs",
                    sql("""
                        SELECT finished_at AS "finished", id::text AS "job", type AS "type",
                               cohort_id AS "cohort", stage AS "stage", attempts AS "attempts",
                               error AS "error"
                        FROM job WHERE state = 'failed' AND $__timeFilter(created_at)
                        ORDER BY created_at DESC LIMIT 50
                    """),
                    w=24,
                )
            )
            .with_panel(
                table_panel(
                    "Discarded knowledge reports",
                    sql("""
                        SELECT received_at AS "received", msg_id::text AS "report", device_id AS "device",
                               base_model_id AS "base model", status_reason AS "reason"
                        FROM knowledge_report WHERE status = 'discarded' AND $__timeFilter(received_at)
                        ORDER BY received_at DESC LIMIT 50
                    """),
                    w=24,
                )
            )
        )
    )
