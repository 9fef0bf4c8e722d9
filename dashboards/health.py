"""Service health from Prometheus: the API's requests, the ingest's flow and broker link, the jobs."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from dashboards.panels import board
from dashboards.promql import prom_stat_panel, prom_timeseries_panel

RATE = "$__rate_interval"  # Grafana's window for rate(): at least four scrapes
SERVICES = 'job=~"diredi-api|diredi-ingest|diredi-worker"'


def quantiles(histogram: str) -> list[tuple[str, str]]:
    """p50, p95 and p99 of a histogram over all its series."""
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{RATE}])))", f"p{round(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    ]


def service_health() -> db.Dashboard:
    """The services' own metrics (uid diredi-service-health); alerts on them: deploy/prometheus."""
    return (
        board(
            "DiReDi · Service health",
            "diredi-service-health",
            "The API, the ingests and the workers as Prometheus scrapes them (docs/monitoring.md).",
        )
        .with_panel(
            prom_stat_panel(
                "Targets up",
                [(f"sum by (job) (up{{{SERVICES}}})", "{{job}}")],
                w=8,
                description="Scraped processes per job; 0 means Prometheus cannot reach any of them.",
            )
        )
        .with_panel(
            prom_stat_panel(
                "Ingests connected",
                [
                    ("sum(diredi_ingest_connected)", "connected"),
                    ("count(diredi_ingest_connected)", "ingests"),
                ],
                w=4,
                description="Ingests connected to the broker, of those scraped.",
            )
        )
        .with_panel(
            prom_stat_panel(
                "Registry readable",
                [("min(diredi_registry_scrape_ok)", "registry")],
                w=4,
                description="1 when every API process read the fleet's counts from the registry.",
            )
        )
        .with_panel(
            prom_stat_panel(
                "Oldest pending job",
                [("max(diredi_jobs_oldest_pending_seconds)", "waited")],
                unit="s",
                w=4,
            )
        )
        .with_panel(
            prom_stat_panel(
                "API errors",
                [
                    (
                        f'sum(rate(diredi_api_requests_total{{status=~"5.."}}[{RATE}]))'
                        f" / sum(rate(diredi_api_requests_total[{RATE}]))",
                        "5xx share",
                    )
                ],
                unit="percentunit",
                w=4,
            )
        )
        .with_panel(
            prom_timeseries_panel(
                "API requests by status",
                [(f"sum by (status) (rate(diredi_api_requests_total[{RATE}]))", "{{status}}")],
                unit="reqps",
            )
        )
        .with_panel(
            prom_timeseries_panel(
                "API latency", quantiles("diredi_api_request_seconds"), unit="s", description="All routes."
            )
        )
        .with_panel(
            prom_timeseries_panel(
                "Slowest routes (p95)",
                [
                    (
                        "topk(5, histogram_quantile(0.95, sum by (le, route) "
                        f"(rate(diredi_api_request_seconds_bucket[{RATE}]))))",
                        "{{route}}",
                    )
                ],
                unit="s",
            )
        )
        .with_panel(
            prom_timeseries_panel(
                "Ingest: stored and refused",
                [
                    (f"sum by (kind) (rate(diredi_ingest_stored_total[{RATE}]))", "stored {{kind}}"),
                    (f"sum by (reason) (rate(diredi_ingest_rejected_total[{RATE}]))", "refused: {{reason}}"),
                ],
                unit="short",
                description="Messages per second committed to the registry, and refused by reason.",
            )
        )
        .with_panel(
            prom_timeseries_panel(
                "Ingest: broker connection",
                [("diredi_ingest_connected", "{{instance}}")],
                max_value=1,
                description="1 while the ingest is connected and subscribed.",
            )
        )
        .with_panel(
            prom_timeseries_panel(
                "Ingest: batch commit time",
                quantiles("diredi_ingest_batch_seconds"),
                unit="s",
            )
        )
        .with_panel(
            prom_timeseries_panel(
                "Worker: jobs run by outcome",
                [(f"sum by (outcome) (increase(diredi_worker_jobs_total[{RATE}]))", "{{outcome}}")],
            )
        )
        .with_panel(
            prom_timeseries_panel("Worker: job duration", quantiles("diredi_worker_job_seconds"), unit="s")
        )
        .with_panel(
            prom_timeseries_panel(
                "Jobs by state",
                [("max by (state) (diredi_jobs)", "{{state}}")],
                description="From the registry, through the API's scrape.",
            )
        )
        .with_panel(
            prom_timeseries_panel(
                "Online devices by cohort",
                [('max by (cohort) (diredi_devices{presence="online"})', "{{cohort}}")],
                description="From the registry, through the API's scrape.",
            )
        )
    )
