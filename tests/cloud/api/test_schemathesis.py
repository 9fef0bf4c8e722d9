"""Schemathesis against the app's own OpenAPI, with an admin key: no 5xx, responses match the schema."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import hypothesis
import schemathesis
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.registry import apikeys, commands, enrolments, jobs, knowledge, telemetry
from cloud.registry.models import decide
from cloud.registry.rollouts import create_rollout
from cloud.registry.tables import Role, utcnow
from device_firmware_py.identity import signing_request
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model, make_report
from wire.messages import CommandName

PROBLEM = "application/problem+json"
EXAMPLES = 25  # per operation and variant; about a minute for both backends on two cores


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
NEGATIVE_CHECKS = [not_a_server_error, negative_data_rejection]


def seed(session: Session, store: LocalArtifactStore) -> dict[str, str]:
    """A small fleet with a row of every kind; returns a known value for each path parameter."""
    make_cohort(session)
    for n in range(3):
        make_device(session, f"cam-{n:04}")
    teacher = make_cloud_model(session, store)
    first = make_edge_model(session, store, teacher_id=teacher.id)
    decide(session, first.id, approve=True)
    second = make_edge_model(session, store, teacher_id=teacher.id)
    msg_id = make_report(session, "cam-0000", first.id)
    job = jobs.create_job(session, type="retrain", cohort_id="kitchen")
    jobs.report_progress(session, job.id, progress=0.4, stage="distill")
    knowledge.consume(session, [msg_id], job_id=job.id)
    rollout = create_rollout(session, model_id=first.id, waves=[["cam-0001"], ["cam-0002"]], created_by="t")
    now = utcnow()
    telemetry.add_samples(
        session,
        [
            {
                "msg_id": uuid.uuid4(),
                "device_id": "cam-0001",
                "at": now - timedelta(minutes=m),
                "accuracy": 0.9,
            }
            for m in range(5)
        ],
    )
    spare, _ = apikeys.create_key(session, role=Role.viewer, name="spare")
    command = commands.create(
        session, device_id="cam-0002", command=CommandName.report_now, ttl=timedelta(hours=1)
    )
    csr = signing_request(ec.generate_private_key(ec.SECP256R1()), "cam-0100")
    enrolments.request(session, serial="cam-0100", csr=csr, batch="b1")
    session.commit()
    return {
        "serial": "cam-0100",
        "cohort_id": "kitchen",
        "device_id": "cam-0002",
        "model_id": second.id,
        "sha256": first.sha256,
        "msg_id": str(msg_id),
        "job_id": str(job.id),
        "rollout_id": str(rollout.id),
        "key_id": spare.id,
        "command_id": str(command.id),
    }


def fuzz(
    operation: APIOperation[Any, Any, Any, Any],
    mode: GenerationMode,
    headers: dict[str, str],
    path_parameters: dict[str, str] | None = None,
) -> None:
    """Call the operation with generated cases and check each response."""
    checks = CHECKS if mode is GenerationMode.POSITIVE else NEGATIVE_CHECKS

    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    def run(case: Case[Any]) -> None:
        response = case.call(headers=headers)
        if mode is GenerationMode.NEGATIVE and response.status_code == 413:
            return  # refused before it is parsed, for its size: a rejection the check does not list
        case.validate_response(response, checks=checks, headers=headers)

    run()


def exercise(
    operation: APIOperation[Any, Any, Any, Any], headers: dict[str, str], known: dict[str, str]
) -> None:
    """Valid input (with generated and with known path parameters) gets a documented answer; invalid
    input gets a 4xx."""
    fuzz(operation, GenerationMode.POSITIVE, headers)
    names = {p.name for p in operation.path_parameters}
    if names:
        fuzz(operation, GenerationMode.POSITIVE, headers, {n: known[n] for n in names})
    try:
        fuzz(operation, GenerationMode.NEGATIVE, headers)
    except hypothesis.errors.Unsatisfiable:
        pass  # the operation takes nothing that could be made invalid (/healthz, /metrics, …)


def test_the_api_conforms_to_its_schema_and_never_answers_5xx(
    app: FastAPI, session: Session, store: LocalArtifactStore, admin: dict[str, str]
) -> None:
    # Prepare
    known = seed(session, store)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]

    # Execute and Assert
    assert len(operations) == len(results) >= 25  # every operation of the schema could be loaded
    for operation in operations:
        exercise(operation, admin, known)


def test_error_responses_are_documented_as_problem_json(client: TestClient) -> None:
    """The API answers every error as application/problem+json (RFC 9457); its OpenAPI should say so."""
    # Execute
    document = client.get("/openapi.json").json()

    # Assert
    misdocumented = sorted(
        f"{method.upper()} {path} {status}: {sorted(response.get('content', {}))}"
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for status, response in operation["responses"].items()
        if status.startswith(("4", "5")) and set(response.get("content", {})) != {PROBLEM}
    )
    assert misdocumented == []
