"""Models: listing and filters, detail with manifest, the approve/reject/retire decisions, lineage."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.registry import jobs, knowledge
from cloud.registry.tables import Device
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model, make_report

MODELS = "/api/v1/models"


@pytest.fixture
def lines(session: Session, store: LocalArtifactStore) -> None:
    """Kitchen: a cloud model and two edge models distilled from it; garden: a cloud model."""
    make_cohort(session)
    make_cohort(session, "garden")
    teacher = make_cloud_model(session, store)
    make_edge_model(session, store, teacher_id=teacher.id)
    make_edge_model(session, store, teacher_id=teacher.id)
    make_cloud_model(session, store, "garden")
    session.commit()


def ids(page: dict[str, list[dict[str, str]]]) -> list[str]:
    return [m["id"] for m in page["items"]]


@pytest.mark.usefixtures("lines")
def test_models_are_listed_newest_version_first_within_each_line(
    client: TestClient, viewer: dict[str, str]
) -> None:
    # Execute
    page = client.get(MODELS, headers=viewer).json()

    # Assert
    assert ids(page) == ["garden.cloud.v1", "kitchen.cloud.v1", "kitchen.v2", "kitchen.v1"]
    assert page["total"] == 4
    assert all(m["status"] == "candidate" for m in page["items"])


@pytest.mark.parametrize(
    ("params", "expected", "total"),
    [
        ({"cohort_id": "kitchen"}, ["kitchen.cloud.v1", "kitchen.v2", "kitchen.v1"], 3),
        ({"kind": "edge"}, ["kitchen.v2", "kitchen.v1"], 2),
        ({"kind": "cloud", "cohort_id": "garden"}, ["garden.cloud.v1"], 1),
        ({"status": "approved"}, ["kitchen.v1"], 1),
        ({"cohort_id": "attic"}, [], 0),
        ({"limit": 1, "offset": 1}, ["kitchen.cloud.v1"], 4),
    ],
)
@pytest.mark.usefixtures("lines")
def test_models_are_filtered(
    client: TestClient,
    viewer: dict[str, str],
    operator: dict[str, str],
    params: dict[str, str | int],
    expected: list[str],
    total: int,
) -> None:
    # Prepare
    client.post(f"{MODELS}/kitchen.v1/approve", json={}, headers=operator)

    # Execute
    page = client.get(MODELS, params=params, headers=viewer).json()

    # Assert
    assert ids(page) == expected
    assert page["total"] == total


@pytest.mark.usefixtures("lines")
def test_an_edge_model_comes_with_its_manifest(
    client: TestClient, store: LocalArtifactStore, viewer: dict[str, str]
) -> None:
    # Execute
    edge = client.get(f"{MODELS}/kitchen.v2", headers=viewer).json()
    cloud = client.get(f"{MODELS}/kitchen.cloud.v1", headers=viewer).json()

    # Assert
    assert edge["kind"] == "edge"
    assert edge["teacher_id"] == "kitchen.cloud.v1"
    assert edge["manifest"]["sha256"] == edge["sha256"]
    assert edge["manifest"]["model_id"] == "kitchen.v2"
    assert edge["size"] == len(store.get(edge["sha256"]))
    assert cloud["kind"] == "cloud"
    assert cloud["manifest"] is None


def test_an_unknown_model_is_404(client: TestClient, viewer: dict[str, str]) -> None:
    # Execute
    detail = client.get(f"{MODELS}/kitchen.v9", headers=viewer)
    lineage = client.get(f"{MODELS}/kitchen.v9/lineage", headers=viewer)

    # Assert
    assert detail.status_code == lineage.status_code == 404
    assert "kitchen.v9" in detail.json()["detail"]


@pytest.mark.parametrize(
    "steps",
    [
        [
            ("approve", 200, "approved"),
            ("approve", 409, "approved"),
            ("reject", 409, "approved"),
            ("retire", 200, "retired"),
            ("retire", 409, "retired"),
            ("approve", 409, "retired"),
        ],
        [("reject", 200, "rejected"), ("approve", 409, "rejected"), ("retire", 409, "rejected")],
        [("retire", 409, "candidate"), ("reject", 200, "rejected"), ("reject", 409, "rejected")],
    ],
    ids=["approve then retire", "reject", "retire a candidate"],
)
@pytest.mark.usefixtures("lines")
def test_decisions_follow_the_state_machine(
    client: TestClient, operator: dict[str, str], steps: list[tuple[str, int, str]]
) -> None:
    for action, status, state in steps:
        # Execute
        response = client.post(
            f"{MODELS}/kitchen.v1/{action}", json={"reason": f"{action}!"}, headers=operator
        )
        model = client.get(f"{MODELS}/kitchen.v1", headers=operator).json()

        # Assert
        assert response.status_code == status, (action, response.text)
        assert model["status"] == state
        if status == 200:
            assert response.json()["status"] == state
            assert model["status_reason"] == f"{action}!"
            assert model["decided_at"] is not None


@pytest.mark.usefixtures("lines")
def test_a_decision_needs_an_operator(client: TestClient, viewer: dict[str, str]) -> None:
    # Execute
    response = client.post(f"{MODELS}/kitchen.v1/approve", json={}, headers=viewer)

    # Assert
    assert response.status_code == 403


def test_lineage_traces_teacher_parent_job_knowledge_and_devices(
    client: TestClient, session: Session, store: LocalArtifactStore, viewer: dict[str, str]
) -> None:
    # Prepare: cam-0001 reports against v1; a job consumes the report and makes v2, which cam-0002 runs
    make_cohort(session)
    for n in (1, 2, 3):
        make_device(session, f"cam-000{n}")
    teacher = make_cloud_model(session, store)
    first = make_edge_model(session, store, teacher_id=teacher.id)
    msg_id = make_report(session, "cam-0001", first.id)
    job = jobs.create_job(session, type="retrain", cohort_id="kitchen")
    knowledge.consume(session, [msg_id], job_id=job.id)
    second = make_edge_model(session, store, teacher_id=teacher.id, parent_id=first.id, job_id=job.id)
    session.get_one(Device, "cam-0002").reported_model_id = second.id
    session.get_one(Device, "cam-0003").desired_model_id = second.id
    session.commit()

    # Execute
    graph = client.get(f"{MODELS}/{second.id}/lineage", headers=viewer).json()

    # Assert
    nodes = {n["id"]: n["type"] for n in graph["nodes"]}
    edges = {(e["source"], e["relation"], e["target"]) for e in graph["edges"]}
    v1, v2, job_node, report = "model:kitchen.v1", "model:kitchen.v2", f"job:{job.id}", f"knowledge:{msg_id}"
    assert graph["model_id"] == "kitchen.v2"
    assert nodes == {
        v1: "model",
        v2: "model",
        "model:kitchen.cloud.v1": "model",
        job_node: "job",
        report: "knowledge",
        "device:cam-0001": "device",
        "device:cam-0002": "device",
        "device:cam-0003": "device",
    }
    assert edges == {
        ("model:kitchen.cloud.v1", "distilled", v2),
        ("model:kitchen.cloud.v1", "distilled", v1),
        (v1, "parent", v2),
        (job_node, "produced", v2),
        (report, "consumed", job_node),
        ("device:cam-0001", "reported", report),
        (v1, "base", report),
        ("device:cam-0002", "runs", v2),
        ("device:cam-0003", "desired", v2),
    }
    assert graph["running_devices_total"] == 1
    assert graph["mermaid"].startswith("flowchart")
    assert "-->|distilled|" in graph["mermaid"]


@pytest.mark.usefixtures("lines")
def test_the_lineage_of_a_lone_cloud_model_is_itself(client: TestClient, viewer: dict[str, str]) -> None:
    # Execute
    graph = client.get(f"{MODELS}/garden.cloud.v1/lineage", headers=viewer).json()

    # Assert
    assert [n["id"] for n in graph["nodes"]] == ["model:garden.cloud.v1"]
    assert graph["edges"] == []
    assert graph["running_devices_total"] == 0
    assert graph["mermaid"].startswith("flowchart")
