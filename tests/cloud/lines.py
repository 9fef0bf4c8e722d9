"""A cohort whose first version has shipped, and real knowledge against it, for pipeline tests."""

from __future__ import annotations

import json
import uuid

from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import ArtifactStore
from cloud.ml.data import ScenarioData
from cloud.ml.families import NetSpec
from cloud.ml.line import EdgeLine
from cloud.ml.scenario import Scenario
from cloud.pipeline.lines import register_line
from cloud.pipeline.scheduling import TRAINING_DATA
from cloud.registry import knowledge, models
from cloud.registry.db import transaction
from device_firmware_py.rd import extract_knowledge
from tests.cloud.factories import make_cohort, make_device


def ship_line(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    line: EdgeLine,
    scenario: Scenario,
    *,
    cohort_id: str = "base",
    devices: tuple[str, ...] = ("cam-1", "cam-2"),
) -> str:
    """Register `line` as the cohort's approved first version, trained on `scenario`'s presumed data,
    with `devices` in the cohort; return the edge model's id."""
    with transaction(sessions) as session:
        make_cohort(session, cohort_id)
        for device_id in devices:
            make_device(session, device_id, cohort_id)
        num_classes = line.artifact.manifest.num_classes
        cloud, edge = register_line(session, store, line, NetSpec(num_classes=num_classes))
        cloud.metrics = {TRAINING_DATA: json.loads(scenario.model_dump_json())}
        models.decide(session, edge.id, approve=True)
        return edge.id


def report_knowledge(
    sessions: sessionmaker[Session],
    line: EdgeLine,
    data: ScenarioData,
    device_id: str,
    *,
    user: int = 0,
    seed: int = 0,
) -> uuid.UUID:
    """A real knowledge report of the scenario's user from their private pool, stored as the ingest
    stores it (`received`); returns its msg_id."""
    pool = data.users[user].device_train[0]
    report = extract_knowledge(line.artifact.load(), pool.x, pool.y, device_id=device_id, seed=seed)
    with transaction(sessions) as session:
        stored = knowledge.store_report(session, report.to_bytes())
        if stored is None:
            raise AssertionError(f"report {report.msg_id} was already stored")
        return stored.msg_id
