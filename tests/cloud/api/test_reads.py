"""The read-only resources: knowledge (metadata only), jobs, rollouts, telemetry, keys, health, metrics."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from cloud.api.main import create_app
from cloud.artifacts import LocalArtifactStore
from cloud.registry import jobs, knowledge, telemetry
from cloud.registry.models import decide
from cloud.registry.rollouts import create_rollout
from cloud.registry.tables import JobState, Role, RolloutTarget, TargetState
from cloud.settings import Settings
from tests.cloud.api.conftest import bearer
from tests.cloud.factories import (
    knowledge_payload,
    make_cloud_model,
    make_cohort,
    make_device,
    make_edge_model,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def fleet(session: Session, store: LocalArtifactStore) -> str:
    """Kitchen with three devices and an approved edge model (returned); garden with one device."""
    make_cohort(session)
    make_cohort(session, "garden")
    for n in (1, 2, 3):
        make_device(session, f"cam-000{n}")
    make_device(session, "gnome-01", "garden")
    edge = make_edge_model(session, store, teacher_id=make_cloud_model(session, store).id)
    decide(session, edge.id, approve=True)
    return edge.id


def test_knowledge_is_served_without_its_payload(
    client: TestClient, session: Session, store: LocalArtifactStore, viewer: dict[str, str]
) -> None:
    # Prepare
    model_id = fleet(session, store)
    payload = knowledge_payload("cam-0001", model_id)
    row = knowledge.store_report(session, payload)
    assert row is not None
    session.commit()
    arrays = [v["data"] for v in json.loads(payload).values() if isinstance(v, dict) and "data" in v]

    # Execute
    listed = client.get("/api/v1/knowledge", headers=viewer)
    one = client.get(f"/api/v1/knowledge/{row.msg_id}", headers=viewer)

    # Assert
    assert listed.json()["items"] == [one.json()]
    assert one.json()["msg_id"] == str(row.msg_id)
    assert one.json()["size_bytes"] == len(payload)
    assert one.json()["schema"]
    for response in (listed, one):
        assert "payload" not in response.text
        assert len(arrays) >= 3
        assert not [data for data in arrays if data in response.text]


def test_knowledge_is_listed_newest_first_with_filters(
    client: TestClient, session: Session, store: LocalArtifactStore, viewer: dict[str, str]
) -> None:
    # Prepare
    model_id = fleet(session, store)
    garden = make_edge_model(
        session, store, teacher_id=make_cloud_model(session, store, "garden").id, cohort_id="garden"
    )
    sent = [("cam-0001", model_id), ("cam-0002", model_id), ("gnome-01", garden.id)]
    rows = [
        knowledge.store_report(session, knowledge_payload(d, m), received_at=T0 + timedelta(minutes=i))
        for i, (d, m) in enumerate(sent)
    ]
    msg_ids = [str(r.msg_id) for r in rows if r is not None]
    job = jobs.create_job(session, type="retrain", cohort_id="kitchen")
    knowledge.consume(session, [uuid.UUID(msg_ids[0])], job_id=job.id)
    session.commit()

    def listed(**params: str) -> list[str]:
        page = client.get("/api/v1/knowledge", params=params, headers=viewer).json()
        assert page["total"] == len(page["items"])
        return [r["msg_id"] for r in page["items"]]

    # Execute and Assert
    assert listed() == msg_ids[::-1]
    assert listed(device_id="cam-0002") == [msg_ids[1]]
    assert listed(cohort_id="kitchen") == [msg_ids[1], msg_ids[0]]
    assert listed(status="consumed") == [msg_ids[0]]
    assert listed(job_id=str(job.id)) == [msg_ids[0]]
    assert listed(status="discarded") == []
    assert client.get(f"/api/v1/knowledge/{uuid.uuid4()}", headers=viewer).status_code == 404


def test_jobs_show_their_progress(client: TestClient, session: Session, viewer: dict[str, str]) -> None:
    # Prepare
    make_cohort(session)
    running = jobs.create_job(session, type="retrain", cohort_id="kitchen", params={"epochs": 3})
    jobs.report_progress(session, running.id, progress=0.4, stage="distill")
    done = jobs.create_job(session, type="export", cohort_id="kitchen")
    jobs.finish(session, done.id, state=JobState.succeeded, result={"model_id": "kitchen.v2"})
    pending = jobs.create_job(session, type="retrain")
    for minutes, job in enumerate((running, done, pending)):
        job.created_at = T0 + timedelta(minutes=minutes)
    session.commit()

    # Execute
    page = client.get("/api/v1/jobs", headers=viewer).json()
    one = client.get(f"/api/v1/jobs/{running.id}", headers=viewer).json()
    retrains = client.get("/api/v1/jobs", params={"type": "retrain"}, headers=viewer).json()
    succeeded = client.get(
        "/api/v1/jobs", params={"state": "succeeded", "cohort_id": "kitchen"}, headers=viewer
    )
    missing = client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=viewer)

    # Assert
    assert [j["id"] for j in page["items"]] == [str(pending.id), str(done.id), str(running.id)]
    assert page["total"] == 3
    assert (one["state"], one["progress"], one["stage"], one["params"]) == (
        "running",
        0.4,
        "distill",
        {"epochs": 3},
    )
    assert one["started_at"] is not None
    assert retrains["total"] == 2
    assert [j["result"] for j in succeeded.json()["items"]] == [{"model_id": "kitchen.v2"}]
    assert succeeded.json()["items"][0]["progress"] == 1.0
    assert missing.status_code == 404


def test_rollouts_show_their_targets_and_progress(
    client: TestClient, session: Session, store: LocalArtifactStore, viewer: dict[str, str]
) -> None:
    # Prepare
    model_id = fleet(session, store)
    rollout = create_rollout(
        session, model_id=model_id, waves=[["cam-0001"], ["cam-0003", "cam-0002"]], created_by="key:abc"
    )
    states = {"cam-0001": TargetState.installed, "cam-0002": TargetState.offered}
    for target in session.query(RolloutTarget).filter(RolloutTarget.rollout_id == rollout.id):
        target.state = states.get(target.device_id, TargetState.pending)
    empty = create_rollout(session, model_id=model_id, waves=[], created_by="key:abc")
    rollout.created_at, empty.created_at = T0, T0 + timedelta(minutes=1)
    session.commit()

    # Execute
    page = client.get("/api/v1/rollouts", headers=viewer).json()
    one = client.get(f"/api/v1/rollouts/{rollout.id}", headers=viewer).json()
    targets = client.get(f"/api/v1/rollouts/{rollout.id}/targets", params={"limit": 2}, headers=viewer).json()
    garden = client.get("/api/v1/rollouts", params={"cohort_id": "garden"}, headers=viewer).json()
    missing = client.get(f"/api/v1/rollouts/{uuid.uuid4()}/targets", headers=viewer)

    # Assert
    assert [r["id"] for r in page["items"]] == [str(empty.id), str(rollout.id)]
    assert page["items"][0]["progress"] == 0.0
    assert one["targets"] == {"pending": 1, "offered": 1, "installed": 1, "failed": 0, "rolled_back": 0}
    assert one["progress"] == 1 / 3
    assert (one["state"], one["model_id"], one["created_by"]) == ("pending", model_id, "key:abc")
    assert [(t["device_id"], t["wave"], t["state"]) for t in targets["items"]] == [
        ("cam-0001", 0, "installed"),
        ("cam-0002", 1, "offered"),
    ]
    assert targets["total"] == 3
    assert garden["total"] == 0
    assert missing.status_code == 404


def test_telemetry_is_queried_by_device_model_and_time(
    client: TestClient, session: Session, viewer: dict[str, str]
) -> None:
    # Prepare: cam-0001 reports each minute from T0 - 9 min to T0; cam-0002 once
    make_cohort(session)
    make_device(session, "cam-0001")
    make_device(session, "cam-0002")
    samples = [
        {
            "msg_id": uuid.uuid4(),
            "device_id": "cam-0001",
            "at": T0 - timedelta(minutes=m),
            "model_id": "kitchen.v1",
        }
        for m in range(10)
    ]
    samples.append({"msg_id": uuid.uuid4(), "device_id": "cam-0002", "at": T0, "model_id": "kitchen.v2"})
    telemetry.add_samples(session, samples)
    session.commit()

    def minutes(**params: str | int) -> list[float]:
        response = client.get("/api/v1/telemetry", params=params, headers=viewer)
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["limit"] == params.get("limit", 1000) and page["offset"] == params.get("offset", 0)
        return [(T0 - datetime.fromisoformat(s["at"])) / timedelta(minutes=1) for s in page["items"]]

    window = {
        "since": (T0 - timedelta(minutes=5)).isoformat(),
        "until": (T0 - timedelta(minutes=1)).isoformat(),
    }

    # Execute and Assert: since inclusive, until exclusive, newest first
    assert minutes(device_id="cam-0001", **window) == [2, 3, 4, 5]
    assert minutes(device_id="cam-0001", limit=3, offset=1) == [1, 2, 3]
    counted = client.get("/api/v1/telemetry", params={"device_id": "cam-0001", "limit": 3}, headers=viewer)
    assert counted.json()["total"] == 10
    assert minutes(model_id="kitchen.v2") == [0]
    assert len(minutes()) == 11
    assert minutes(since="2026-01-01T13:00:00+01:00", device_id="cam-0001") == [0]  # the same instant as T0


def test_api_keys_are_listed_without_secrets(
    client: TestClient, keys: dict[Role, str], admin: dict[str, str]
) -> None:
    # Prepare
    created = client.post("/api/v1/api-keys", json={"role": "operator", "name": "ci"}, headers=admin)

    # Execute
    page = client.get("/api/v1/api-keys", headers=admin)
    with_new_key = client.get("/api/v1/devices", headers=bearer(created.json()["secret"]))

    # Assert
    assert created.status_code == 201
    assert page.json()["total"] == 4
    assert {k["role"] for k in page.json()["items"]} == {"viewer", "operator", "admin"}
    assert all(secret not in page.text for secret in [*keys.values(), created.json()["secret"]])
    assert "hash" not in page.text
    assert with_new_key.status_code == 200


def test_readyz_answers_when_the_database_does(client: TestClient, viewer: dict[str, str]) -> None:
    # Execute
    response = client.get("/readyz", headers=viewer)

    # Assert
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_an_unreachable_database_is_503_not_500(tmp_path: Path) -> None:
    # Prepare: nothing listens on port 1
    settings = Settings(data_dir=tmp_path, database_url="postgresql://diredi:x@127.0.0.1:1/diredi")
    app = create_app(settings)

    # Execute
    with TestClient(app, raise_server_exceptions=False) as client:
        ready = client.get("/readyz", headers=bearer("drk_0123456789ab_" + "x" * 43))

    # Assert
    assert ready.status_code == 503, ready.text
    assert ready.headers["content-type"] == "application/problem+json"


def test_a_listing_on_a_lost_database_connection_is_503_and_the_next_one_reconnects(
    client: TestClient, session: Session, viewer: dict[str, str]
) -> None:
    # The listing runs on the driver's cursor on PostgreSQL, below SQLAlchemy: its errors must still be
    # SQLAlchemy's (a 503 problem), and the dead connection must leave the pool.
    # Prepare
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("a PostgreSQL backend is what can be terminated")
    make_cohort(session)
    make_device(session, "cam-0001")
    session.commit()
    assert client.get("/api/v1/devices", headers=viewer).status_code == 200  # the key is cached now
    session.execute(
        text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE '%total_matching_rows%'"
            " AND pid <> pg_backend_pid()"
        )
    )
    session.commit()

    # Execute
    lost = client.get("/api/v1/devices", headers=viewer)
    again = client.get("/api/v1/devices", headers=viewer)

    # Assert
    assert lost.status_code == 503, lost.text
    assert lost.headers["content-type"] == "application/problem+json"
    assert again.status_code == 200
    assert [d["id"] for d in again.json()["items"]] == ["cam-0001"]


def test_metrics_count_requests_by_route_template(
    client: TestClient, viewer: dict[str, str], keys: dict[Role, str]
) -> None:
    # Prepare
    client.get("/api/v1/devices/cam-4242", headers=viewer)
    client.get("/no/such/route", headers=viewer)

    # Execute
    response = client.get("/metrics", headers=viewer)

    # Assert
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'diredi_api_requests_total{method="GET",route="/api/v1/devices/{device_id}",status="404"}' in text
    assert 'route="unmatched"' in text
    assert "cam-4242" not in text
    assert "/no/such/route" not in text
    assert "diredi_api_request_seconds_bucket" in text
