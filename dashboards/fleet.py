"""Fleet overview: devices online, model versions in the field, rollouts and their progress."""

# The panels' SQL is composed from constants in this module when the JSON is built; no input reaches it.
# ruff: noqa: S608

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import dashboard as dm

from cloud.registry.tables import Presence, RolloutState
from dashboards.panels import (
    bars_panel,
    board,
    count_of,
    pie_panel,
    sql,
    stat_panel,
    table_panel,
    timeseries_panel,
)
from dashboards.sqlquery import datasource

# The `cohort` variable (several, or All) filters every panel: Grafana quotes each value ('a','b').
COHORT = "cohort_id IN ($cohort)"
ACTIVE = f"status = 'active' AND {COHORT}"
PROGRESS = "count(*) FILTER (WHERE t.state = 'installed')::float / nullif(count(t.device_id), 0)"


def fleet_overview() -> db.Dashboard:
    """The fleet at a glance (uid diredi-fleet)."""
    return (
        board("DiReDi · Fleet overview", "diredi-fleet", "Devices, the models they run, and rollouts.")
        .with_variable(
            db.QueryVariable("cohort")
            .label("Cohort")
            .datasource(datasource())
            .query("SELECT id FROM cohort ORDER BY id")
            .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
            .sort(dm.VariableSort.DISABLED)
            .multi(True)
            .include_all(True)
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )
        .with_panel(stat_panel("Devices", count_of("devices", ACTIVE), w=4))
        .with_panel(stat_panel("Online", count_of("online", f"{ACTIVE} AND presence = 'online'"), w=4))
        .with_panel(stat_panel("Offline", count_of("offline", f"{ACTIVE} AND presence = 'offline'"), w=4))
        .with_panel(stat_panel("Revoked", count_of("revoked", f"status = 'revoked' AND {COHORT}"), w=4))
        .with_panel(
            stat_panel(
                "Out of sync",
                count_of(
                    "out of sync",
                    f"{ACTIVE} AND desired_model_id IS NOT NULL"
                    " AND desired_model_id IS DISTINCT FROM reported_model_id",
                ),
                w=4,
                description="Active devices not (yet) running the model the registry wants on them.",
            )
        )
        .with_panel(
            stat_panel(
                "Active rollouts",
                count_of("rollouts", f"state IN ('pending', 'running', 'paused') AND {COHORT}", "rollout"),
                w=4,
            )
        )
        .with_panel(
            pie_panel(
                "Devices by presence",
                sql(f"""
                    SELECT presence AS "presence", count(*) AS "devices"
                    FROM device WHERE {ACTIVE}
                    GROUP BY presence ORDER BY presence
                """),
                states=Presence,
            )
        )
        .with_panel(
            timeseries_panel(
                "Devices reporting",
                sql(f"""
                    SELECT $__timeGroupAlias(at, $__interval),
                           count(DISTINCT device_id) AS "devices reporting"
                    FROM telemetry
                    WHERE $__timeFilter(at) AND device_id IN (SELECT id FROM device WHERE {COHORT})
                    GROUP BY 1 ORDER BY 1
                """),
                w=10,
                description="Devices that sent at least one status message in each interval.",
            )
        )
        .with_panel(
            bars_panel(
                "Devices per reported model",
                sql(f"""
                    SELECT coalesce(reported_model_id, '(none)') AS "model", count(*) AS "devices"
                    FROM device WHERE {ACTIVE}
                    GROUP BY 1 ORDER BY 2 DESC, 1
                """),
                w=8,
            )
        )
        .with_panel(
            table_panel(
                "Model versions in the field",
                sql("""
                    SELECT coalesce(d.reported_model_id, '(none)') AS "model", m.kind AS "kind",
                           m.version AS "version", m.status AS "status", count(*) AS "devices",
                           count(*) FILTER (WHERE d.presence = 'online') AS "online"
                    FROM device d LEFT JOIN model m ON m.id = d.reported_model_id
                    WHERE d.status = 'active' AND d.cohort_id IN ($cohort)
                    GROUP BY 1, 2, 3, 4 ORDER BY "devices" DESC, 1
                """),
            )
        )
        .with_panel(
            table_panel(
                "Desired vs reported model",
                sql(f"""
                    SELECT coalesce(desired_model_id, '(none)') AS "desired",
                           coalesce(reported_model_id, '(none)') AS "reported",
                           desired_model_id IS NOT DISTINCT FROM reported_model_id AS "in sync",
                           count(*) AS "devices"
                    FROM device WHERE {ACTIVE}
                    GROUP BY 1, 2, 3 ORDER BY 1, 2
                """),
            )
        )
        .with_panel(
            table_panel(
                "Rollouts",
                sql(f"""
                    SELECT r.created_at AS "created", r.cohort_id AS "cohort", r.model_id AS "model",
                           r.state AS "state", r.current_wave AS "wave", count(t.device_id) AS "targets",
                           count(*) FILTER (WHERE t.state = 'installed') AS "installed",
                           count(*) FILTER (WHERE t.state = 'failed') AS "failed",
                           {PROGRESS} AS "progress"
                    FROM rollout r LEFT JOIN rollout_target t ON t.rollout_id = r.id
                    WHERE r.cohort_id IN ($cohort)
                    GROUP BY r.id ORDER BY r.created_at DESC LIMIT 20
                """),
                w=16,
                gauges=["progress"],
                states=RolloutState,
                description="Progress is the rollout's installed targets over all its targets.",
            )
        )
        .with_panel(
            bars_panel(
                "Rollout progress",
                sql(f"""
                    SELECT r.model_id || ' (' || r.state || ')' AS "rollout", {PROGRESS} AS "installed"
                    FROM rollout r LEFT JOIN rollout_target t ON t.rollout_id = r.id
                    WHERE r.cohort_id IN ($cohort)
                    GROUP BY r.id ORDER BY r.created_at DESC LIMIT 10
                """),
                w=8,
                unit="percentunit",
                max_value=1,
            )
        )
    )
