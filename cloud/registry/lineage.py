"""Lineage of a model: a graph, read from the registry, of everything that made it and where it runs."""

import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.registry.models import get_model
from cloud.registry.tables import Device, Job, KnowledgeReport, Model

NodeType = Literal["model", "job", "knowledge", "device"]
Relation = Literal["parent", "distilled", "base", "reported", "consumed", "produced", "runs", "desired"]
MAX_RUNNING_DEVICES = 1000  # a lineage lists at most this many devices running the model; the total is given


@dataclass(frozen=True)
class Node:
    """One thing in the graph: a model, a job, a knowledge report or a device."""

    id: str
    type: NodeType
    label: str


@dataclass(frozen=True)
class Edge:
    """`source` contributed to `target` as `relation` (edges point from cause to effect)."""

    source: str
    target: str
    relation: Relation


@dataclass
class Lineage:
    """The lineage graph of one model."""

    model_id: str
    nodes: dict[str, Node] = field(default_factory=dict)
    links: dict[Edge, None] = field(default_factory=dict)  # ordered, and O(1) to de-duplicate
    running_devices_total: int = 0

    @property
    def edges(self) -> list[Edge]:
        """The edges in the order they were found."""
        return list(self.links)

    def add(self, node: Node) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id

    def link(self, source: str, target: str, relation: Relation) -> None:
        self.links.setdefault(Edge(source, target, relation), None)

    def mermaid(self) -> str:
        """A Mermaid flowchart of the graph, for humans."""
        shapes = {
            "model": ('["', '"]'),
            "job": ('(["', '"])'),
            "knowledge": ('[/"', '"/]'),
            "device": ('(("', '"))'),
        }
        names = {node_id: f"n{i}" for i, node_id in enumerate(self.nodes)}
        lines = ["flowchart LR"]
        for node_id, node in self.nodes.items():
            left, right = shapes[node.type]
            lines.append(f"    {names[node_id]}{left}{node.label.replace(chr(34), '#quot;')}{right}")
        for edge in self.links:
            lines.append(f"    {names[edge.source]} -->|{edge.relation}| {names[edge.target]}")
        return "\n".join(lines)


def _model_node(model: Model) -> Node:
    return Node(f"model:{model.id}", "model", f"{model.id} ({model.kind.value}, {model.status.value})")


def _job_node(job: Job) -> Node:
    return Node(f"job:{job.id}", "job", f"job {job.type} {str(job.id)[:8]} ({job.state.value})")


def _device_node(device_id: str) -> Node:
    return Node(f"device:{device_id}", "device", device_id)


def lineage(session: Session, model_id: str) -> Lineage:
    """The model's teacher/parent chain, the jobs and knowledge reports (and devices) behind each
    model in it, and the devices that run or should run the model now."""
    root = get_model(session, model_id)
    graph = Lineage(model_id=root.id)
    queue: deque[Model] = deque([root])
    seen: set[str] = set()
    seen_jobs: set[uuid.UUID] = set()
    while queue:
        model = queue.popleft()
        if model.id in seen:
            continue
        seen.add(model.id)
        node = graph.add(_model_node(model))
        for ref, relation in ((model.parent_id, "parent"), (model.teacher_id, "distilled")):
            if ref is not None:
                upstream = get_model(session, ref)
                graph.link(graph.add(_model_node(upstream)), node, relation)  # type: ignore[arg-type]
                queue.append(upstream)
        if model.job_id is None:
            continue
        job = session.get_one(Job, model.job_id)
        job_node = graph.add(_job_node(job))
        graph.link(job_node, node, "produced")
        if job.id in seen_jobs:
            continue
        seen_jobs.add(job.id)
        reports = session.scalars(
            select(KnowledgeReport)
            .where(KnowledgeReport.job_id == job.id)
            .order_by(KnowledgeReport.received_at)
        ).all()
        for report in reports:
            report_node = graph.add(
                Node(f"knowledge:{report.msg_id}", "knowledge", f"knowledge {str(report.msg_id)[:8]}")
            )
            graph.link(report_node, job_node, "consumed")
            graph.link(graph.add(_device_node(report.device_id)), report_node, "reported")
            base = get_model(session, report.base_model_id)
            graph.link(graph.add(_model_node(base)), report_node, "base")
            queue.append(base)
    _running(session, graph, root)
    return graph


def _running(session: Session, graph: Lineage, model: Model) -> None:
    node = f"model:{model.id}"
    graph.running_devices_total = int(
        session.scalar(select(func.count()).where(Device.reported_model_id == model.id)) or 0
    )
    for column, relation in ((Device.reported_model_id, "runs"), (Device.desired_model_id, "desired")):
        device_ids = session.scalars(
            select(Device.id).where(column == model.id).order_by(Device.id).limit(MAX_RUNNING_DEVICES)
        ).all()
        for device_id in device_ids:
            graph.link(graph.add(_device_node(device_id)), node, relation)  # type: ignore[arg-type]
