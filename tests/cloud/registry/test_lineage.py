"""Lineage: a two-generation line read back as a graph, edge by edge; and a real exported model stored."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import NotFoundError
from cloud.registry import devices, jobs, knowledge, models
from cloud.registry.lineage import Lineage, lineage
from cloud.registry.tables import ModelKind
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model, make_report

if TYPE_CHECKING:
    from cloud.ml.line import EdgeLine


@dataclass
class TwoGenerations:
    """The ids of a line that went teacher → edge v1 → knowledge → teacher v2 → edge v2."""

    job: str
    report_a: str
    report_b: str


def build_two_generations(session: Session, store: LocalArtifactStore) -> TwoGenerations:
    """Teacher v1 → edge v1 on cam-a and cam-b → their knowledge → RD job → teacher v2 → edge v2 on cam-a."""
    make_cohort(session)
    make_device(session, "cam-a")
    make_device(session, "cam-b")
    make_device(session, "cam-c")  # in the cohort, but contributes nothing and runs nothing
    teacher_1 = make_cloud_model(session, store)
    edge_1 = make_edge_model(session, store, teacher_id=teacher_1.id)
    for name in ("cam-a", "cam-b"):
        devices.get_device(session, name).reported_model_id = edge_1.id
    report_a = make_report(session, "cam-a", edge_1.id)
    report_b = make_report(session, "cam-b", edge_1.id)
    job = jobs.create_job(session, type="rd_update", cohort_id="kitchen")
    knowledge.consume(session, [report_a, report_b], job_id=job.id)
    teacher_2 = make_cloud_model(session, store, parent_id=teacher_1.id, job_id=job.id)
    edge_2 = make_edge_model(session, store, teacher_id=teacher_2.id, parent_id=edge_1.id, job_id=job.id)
    devices.get_device(session, "cam-a").reported_model_id = edge_2.id
    session.commit()
    assert (teacher_2.id, edge_2.id) == ("kitchen.cloud.v2", "kitchen.v2")
    return TwoGenerations(
        job=f"job:{job.id}", report_a=f"knowledge:{report_a}", report_b=f"knowledge:{report_b}"
    )


def edge_set(graph: Lineage) -> set[tuple[str, str, str]]:
    """The graph's edges as (source, target, relation)."""
    return {(e.source, e.target, e.relation) for e in graph.edges}


def mermaid_names(chart: str) -> dict[str, str]:
    """Each node's label → its short name in the Mermaid chart."""
    names = {}
    for line in chart.splitlines()[1:]:
        match = re.fullmatch(r"\s+(n\d+)[\[\(/]+\"(.*)\"[\]\)/]+", line)
        if match:
            names[match.group(2)] = match.group(1)
    return names


def test_lineage_of_edge_v2_has_every_edge(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    ids = build_two_generations(session, store)

    # Execute
    graph = lineage(session, "kitchen.v2")

    # Assert
    assert edge_set(graph) == {
        ("model:kitchen.v1", "model:kitchen.v2", "parent"),
        ("model:kitchen.cloud.v2", "model:kitchen.v2", "distilled"),
        (ids.job, "model:kitchen.v2", "produced"),
        (ids.job, "model:kitchen.cloud.v2", "produced"),
        ("model:kitchen.cloud.v1", "model:kitchen.cloud.v2", "parent"),
        ("model:kitchen.cloud.v1", "model:kitchen.v1", "distilled"),
        (ids.report_a, ids.job, "consumed"),
        (ids.report_b, ids.job, "consumed"),
        ("device:cam-a", ids.report_a, "reported"),
        ("device:cam-b", ids.report_b, "reported"),
        ("model:kitchen.v1", ids.report_a, "base"),
        ("model:kitchen.v1", ids.report_b, "base"),
        ("device:cam-a", "model:kitchen.v2", "runs"),
    }
    assert len(graph.edges) == len(edge_set(graph))  # no duplicates


def test_lineage_nodes_carry_their_types(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    ids = build_two_generations(session, store)

    # Execute
    graph = lineage(session, "kitchen.v2")

    # Assert
    assert graph.model_id == "kitchen.v2"
    assert {node_id: node.type for node_id, node in graph.nodes.items()} == {
        "model:kitchen.v2": "model",
        "model:kitchen.v1": "model",
        "model:kitchen.cloud.v1": "model",
        "model:kitchen.cloud.v2": "model",
        ids.job: "job",
        ids.report_a: "knowledge",
        ids.report_b: "knowledge",
        "device:cam-a": "device",
        "device:cam-b": "device",
    }
    assert graph.nodes["model:kitchen.v2"].label == "kitchen.v2 (edge, candidate)"
    assert "rd_update" in graph.nodes[ids.job].label
    assert graph.running_devices_total == 1


def test_lineage_mermaid_draws_every_node_and_edge(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    build_two_generations(session, store)
    graph = lineage(session, "kitchen.v2")

    # Execute
    chart = graph.mermaid()

    # Assert
    names = mermaid_names(chart)
    assert chart.startswith("flowchart LR\n")
    assert set(names) == {node.label for node in graph.nodes.values()}
    name_of = {node_id: names[node.label] for node_id, node in graph.nodes.items()}
    edge_lines = [line.strip() for line in chart.splitlines() if "-->" in line]
    assert sorted(edge_lines) == sorted(
        f"{name_of[e.source]} -->|{e.relation}| {name_of[e.target]}" for e in graph.edges
    )


def test_lineage_of_edge_v1_stops_before_generation_two(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    build_two_generations(session, store)

    # Execute
    graph = lineage(session, "kitchen.v1")

    # Assert
    assert set(graph.nodes) == {"model:kitchen.v1", "model:kitchen.cloud.v1", "device:cam-b"}
    assert edge_set(graph) == {
        ("model:kitchen.cloud.v1", "model:kitchen.v1", "distilled"),
        ("device:cam-b", "model:kitchen.v1", "runs"),
    }
    assert graph.running_devices_total == 1


def test_lineage_shows_devices_that_should_run_the_model(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    build_two_generations(session, store)
    devices.get_device(session, "cam-c").desired_model_id = "kitchen.v2"
    session.commit()

    # Execute
    graph = lineage(session, "kitchen.v2")

    # Assert
    assert ("device:cam-c", "model:kitchen.v2", "desired") in edge_set(graph)
    assert graph.nodes["device:cam-c"].type == "device"
    assert graph.running_devices_total == 1  # desired is not running


def test_lineage_of_an_unknown_model_is_not_found(session: Session) -> None:
    # Execute / Assert
    with pytest.raises(NotFoundError):
        lineage(session, "kitchen.v9")


@pytest.mark.slow
def test_a_real_exported_line_is_stored_byte_for_byte(
    session: Session, store: LocalArtifactStore, base_line: EdgeLine
) -> None:
    # Prepare
    import torch

    make_cohort(session, "base")
    buffer = io.BytesIO()
    torch.save(base_line.teacher.state_dict(), buffer)
    weights = buffer.getvalue()
    artifact = base_line.artifact

    # Execute
    teacher = models.register_cloud_model(session, store, cohort_id="base", weights=weights)
    edge = models.register_edge_model(
        session, store, model=artifact.model, manifest=artifact.manifest, teacher_id=teacher.id
    )
    session.commit()
    session.expire_all()
    stored = models.get_model(session, base_line.model_id)

    # Assert
    assert (edge.id, stored.kind, stored.version) == (artifact.manifest.model_id, ModelKind.edge, 1)
    assert store.get(stored.sha256) == artifact.model
    assert models.edge_manifest(stored) == artifact.manifest
    assert models.edge_manifest(stored).to_json() == artifact.manifest.to_json()
    restored = torch.load(io.BytesIO(store.get(teacher.sha256)), weights_only=True)
    expected = base_line.teacher.state_dict()
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[name], expected[name]) for name in expected)
    assert lineage(session, stored.id).nodes[f"model:{teacher.id}"].type == "model"
