"""Prometheus metrics of the API: requests by route and status, latency, and the fleet's health read from
the registry at scrape time; served at /metrics."""

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.api.deps import ServicesDep, Viewer
from cloud.registry.health import FleetHealth, fleet_health

log = logging.getLogger(__name__)

REQUESTS = Counter("diredi_api_requests_total", "API requests", ["method", "route", "status"])
LATENCY = Histogram(
    "diredi_api_request_seconds",
    "API request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(_: Viewer, services: ServicesDep) -> Response:
    """Prometheus metrics of this process and the fleet's health from the registry (scrape with a viewer
    key as the bearer token). When the registry does not answer, `diredi_registry_scrape_ok` is 0 and
    the process's own metrics are served all the same."""
    fleet = CollectorRegistry(auto_describe=False)
    fleet.register(FleetCollector(services.sessions))
    fleet.register(CrlCollector(services.settings.resolved_fleet_ca_dir / "crl.pem"))
    return Response(generate_latest() + generate_latest(fleet), media_type=CONTENT_TYPE_LATEST)


class FleetCollector(Collector):
    """Gauges computed from the registry when scraped: devices by cohort and presence, rollouts by cohort
    and state, jobs by state and the oldest pending job's wait (two aggregate queries per scrape)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            with self.sessions() as session:
                health = fleet_health(session)
        except SQLAlchemyError as exc:
            log.warning("the fleet's metrics are missing from this scrape: %s", exc.__class__.__name__)
            health = None
        ok = GaugeMetricFamily("diredi_registry_scrape_ok", "1 if the registry answered the fleet's queries")
        ok.add_metric([], 0.0 if health is None else 1.0)
        yield ok
        took = GaugeMetricFamily("diredi_registry_scrape_seconds", "Time the fleet's queries took")
        took.add_metric([], time.perf_counter() - started)
        yield took
        if health is not None:
            yield from _fleet_families(health)


def _fleet_families(health: FleetHealth) -> Iterator[Metric]:
    devices = GaugeMetricFamily(
        "diredi_devices", "Active devices, by cohort and presence", labels=["cohort", "presence"]
    )
    for (cohort, presence), n in sorted(health.devices.items()):
        devices.add_metric([cohort, presence], n)
    yield devices
    rollouts = GaugeMetricFamily(
        "diredi_rollouts", "Rollouts, by cohort and state", labels=["cohort", "state"]
    )
    for (cohort, state), n in sorted(health.rollouts.items()):
        rollouts.add_metric([cohort, state], n)
    yield rollouts
    jobs = GaugeMetricFamily("diredi_jobs", "Pipeline jobs, by state", labels=["state"])
    for state, n in sorted(health.jobs.items()):
        jobs.add_metric([state], n)
    yield jobs
    yield GaugeMetricFamily(
        "diredi_jobs_oldest_pending_seconds",
        "How long the oldest pending job has waited (0: none waits)",
        value=health.oldest_pending_s,
    )


class CrlCollector(Collector):
    """When the fleet CA's CRL is next due, read from its file when scraped: the broker refuses every
    certificate device once that time passes (the beat re-issues it daily). Nothing without a CRL."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[Metric]:
        try:
            next_update = x509.load_pem_x509_crl(self.path.read_bytes()).next_update_utc
        except (OSError, ValueError):
            return  # no certificate devices (no CRL yet), or an unreadable file: the alert's absence rule
        if next_update is not None:
            yield GaugeMetricFamily(
                "diredi_crl_next_update_timestamp_seconds",
                "When the fleet CA's CRL must have been re-issued (Unix time)",
                value=next_update.timestamp(),
            )


class RequestMetrics:
    """Counts and times every request under its route template (not its raw path: bounded labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], template, str(status)).inc()
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
