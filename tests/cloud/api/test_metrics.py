"""GET /metrics: the fleet's health read from the registry at scrape time, and what a registry outage does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.fleet_ca import CRL_DAYS, FleetCA
from cloud.registry import jobs
from cloud.registry.db import make_engine, session_factory
from cloud.registry.tables import JobState, Presence, Rollout, RolloutState, utcnow
from cloud.settings import Settings
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model

UNREACHABLE = "postgresql://nobody:nothing@127.0.0.1:1/none"  # a closed port: refused at once


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels, parsed as Prometheus parses it."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def seed_fleet(session: Session, store: LocalArtifactStore) -> None:
    """Two cohorts: kitchen with 3 online, 1 offline, 1 revoked and a halted rollout; garage empty."""
    make_cohort(session, "kitchen")
    make_cohort(session, "garage")
    for n, presence in enumerate([Presence.online] * 3 + [Presence.offline, Presence.online]):
        device, _ = make_device(session, f"cam-{n:04d}", "kitchen")
        device.presence = presence
    device.status = device.status.revoked  # the last one: it no longer counts
    teacher = make_cloud_model(session, store, "kitchen")
    edge = make_edge_model(session, store, teacher_id=teacher.id, cohort_id="kitchen")
    session.add(Rollout(cohort_id="kitchen", model_id=edge.id, state=RolloutState.halted))
    waiting = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    waiting.created_at = utcnow() - timedelta(minutes=40)
    jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    jobs.create_job(session, type="rd_cycle", cohort_id="kitchen").state = JobState.failed
    session.commit()


def test_metrics_count_the_fleet_by_cohort_and_state(
    client: TestClient, viewer: dict[str, str], session: Session, store: LocalArtifactStore
) -> None:
    # Prepare
    seed_fleet(session, store)

    # Execute
    response = client.get("/metrics", headers=viewer)

    # Assert
    assert response.status_code == 200, response.text
    got = samples(response.text)
    assert got[("diredi_registry_scrape_ok", ())] == 1.0
    assert got[("diredi_devices", (("cohort", "kitchen"), ("presence", "online")))] == 3
    assert got[("diredi_devices", (("cohort", "kitchen"), ("presence", "offline")))] == 1
    assert got[("diredi_devices", (("cohort", "kitchen"), ("presence", "unknown")))] == 0
    # a cohort without devices or rollouts still has its series, at zero
    assert got[("diredi_devices", (("cohort", "garage"), ("presence", "online")))] == 0
    assert got[("diredi_rollouts", (("cohort", "garage"), ("state", "halted")))] == 0
    assert got[("diredi_rollouts", (("cohort", "kitchen"), ("state", "halted")))] == 1
    assert got[("diredi_rollouts", (("cohort", "kitchen"), ("state", "running")))] == 0
    assert got[("diredi_jobs", (("state", "pending"),))] == 2
    assert got[("diredi_jobs", (("state", "failed"),))] == 1
    assert got[("diredi_jobs", (("state", "succeeded"),))] == 0
    assert 40 * 60 <= got[("diredi_jobs_oldest_pending_seconds", ())] < 50 * 60


def test_an_empty_registry_has_no_waiting_job(client: TestClient, viewer: dict[str, str]) -> None:
    response = client.get("/metrics", headers=viewer)

    got = samples(response.text)
    assert got[("diredi_jobs_oldest_pending_seconds", ())] == 0
    assert got[("diredi_jobs", (("state", "pending"),))] == 0
    assert not any(name == "diredi_devices" for name, _ in got)


def test_a_registry_outage_leaves_the_process_metrics_served(
    app: FastAPI, client: TestClient, viewer: dict[str, str]
) -> None:
    # Prepare: the key is checked (and cached) while the registry answers; then its queries fail.
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics", headers=viewer).status_code == 200
    services = app.state.services
    registry, services.sessions = services.sessions, session_factory(make_engine(UNREACHABLE))

    # Execute
    try:
        response = client.get("/metrics", headers=viewer)
    finally:
        services.sessions.kw["bind"].dispose()
        services.sessions = registry

    # Assert
    assert response.status_code == 200, response.text
    got = samples(response.text)
    assert got[("diredi_registry_scrape_ok", ())] == 0.0
    assert ("diredi_registry_scrape_seconds", ()) in got
    assert not any(name.startswith(("diredi_devices", "diredi_jobs")) for name, _ in got)
    assert (
        got[("diredi_api_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200")))] >= 1
    )


def test_metrics_need_a_key(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401


def test_the_crls_next_update_is_a_gauge_once_the_fleet_ca_has_one(
    client: TestClient, viewer: dict[str, str], settings: Settings
) -> None:
    # Prepare
    before = samples(client.get("/metrics", headers=viewer).text)
    ca = FleetCA.open(settings.resolved_fleet_ca_dir)
    now = datetime.now(UTC)
    ca.write_crl([], now=now)

    # Execute
    after = samples(client.get("/metrics", headers=viewer).text)

    # Assert: none without a CRL; 30 days out with one
    name = ("diredi_crl_next_update_timestamp_seconds", ())
    assert name not in before
    assert after[name] == pytest.approx((now + timedelta(days=CRL_DAYS)).timestamp(), abs=1)
