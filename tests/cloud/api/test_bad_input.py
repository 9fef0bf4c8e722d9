"""Bad input gets a clear 4xx problem naming what is wrong, and changes nothing in the registry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.registry.models import decide
from cloud.registry.tables import Base, Device, Model
from tests.cloud.api.inventory import Reply
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model

PROBLEM = "application/problem+json"
DEVICES = "/api/v1/devices"
APPROVED, CANDIDATE = "kitchen.v1", "kitchen.v2"


@dataclass(frozen=True)
class Bad:
    """A request that must be refused with `status`, its detail naming each of `words`."""

    method: str
    url: str
    status: int
    words: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def device(**fields: Any) -> dict[str, Any]:
    return {"json": {"id": "cam-0002", "cohort_id": "kitchen", **fields}}


CASES: dict[str, Bad] = {
    "not json": Bad("POST", DEVICES, 422, ("JSON",), {"content": b"{not json"}),
    "duplicate id": Bad(
        "POST",
        DEVICES,
        422,
        ("body.id", "duplicate key 'id'"),
        {"content": b'{"id": "cam-0002", "cohort_id": "kitchen", "id": "cam-0003"}'},
    ),
    "duplicate escaped key": Bad(
        "POST",
        DEVICES,
        422,
        ("body.cohort_id", "duplicate"),
        {"content": b'{"id": "cam-0002", "cohort_id": "kitchen", "cohort\\u005fid": "garden"}'},
    ),
    "duplicate nested label": Bad(
        "POST",
        DEVICES,
        422,
        ("body.labels.site", "duplicate key 'site'"),
        {"content": b'{"id": "cam-0002", "cohort_id": "kitchen", "labels": {"site": "a", "site": "b"}}'},
    ),
    "duplicate cohort id": Bad(
        "POST",
        "/api/v1/cohorts",
        422,
        ("body.id", "duplicate"),
        {"content": b'{"id": "garden", "id": "porch"}'},
    ),
    "duplicate in a list": Bad(
        "POST",
        "/api/v1/cohorts",
        422,
        ("body.extra.1.k", "duplicate key 'k'"),
        {"content": b'{"id": "garden", "extra": [{"k": 1}, {"k": 1, "k": 2}]}'},
    ),
    "duplicate role": Bad(
        "POST",
        "/api/v1/api-keys",
        422,
        ("body.role", "duplicate"),
        {"content": b'{"role": "viewer", "name": "ci", "role": "admin"}'},
    ),
    "duplicate reason": Bad(
        "POST",
        f"/api/v1/models/{CANDIDATE}/approve",
        422,
        ("body.reason",),
        {"content": b'{"reason": "ok", "reason": "ok"}'},
    ),
    "json array": Bad("POST", DEVICES, 422, ("body", "object"), {"json": [{"id": "cam-0002"}]}),
    "json string": Bad("POST", DEVICES, 422, ("body", "object"), {"json": "cam-0002"}),
    "id of wrong type": Bad("POST", DEVICES, 422, ("body.id", "string"), device(id=5)),
    "labels of wrong type": Bad("POST", DEVICES, 422, ("body.labels",), device(labels=["a"])),
    "unknown field": Bad("POST", DEVICES, 422, ("body.colour", "Extra"), device(colour="red")),
    "missing field": Bad("POST", DEVICES, 422, ("body.cohort_id", "required"), {"json": {"id": "cam-0002"}}),
    "over-long id": Bad("POST", DEVICES, 422, ("body.id", "pattern"), device(id="c" * 64)),
    "too short id": Bad("POST", DEVICES, 422, ("body.id",), device(id="ab")),
    "uppercase id": Bad("POST", DEVICES, 422, ("body.id",), device(id="Cam-0002")),
    "underscore id": Bad("POST", DEVICES, 422, ("body.id",), device(id="cam_0002")),
    "leading hyphen": Bad("POST", DEVICES, 422, ("body.id",), device(id="-cam-0002")),
    "bad cohort id": Bad("POST", DEVICES, 422, ("body.cohort_id",), device(cohort_id="Kitchen!")),
    "too many labels": Bad(
        "POST", DEVICES, 422, ("body.labels",), device(labels={f"k{i}": "v" for i in range(33)})
    ),
    "over-long label": Bad("POST", DEVICES, 422, ("body.labels",), device(labels={"site": "x" * 129})),
    "duplicate device": Bad("POST", DEVICES, 409, ("cam-0001", "exists"), device(id="cam-0001")),
    "unknown cohort": Bad("POST", DEVICES, 404, ("cohort", "garden"), device(cohort_id="garden")),
    "duplicate cohort": Bad("POST", "/api/v1/cohorts", 409, ("kitchen",), {"json": {"id": "kitchen"}}),
    "over-long description": Bad(
        "POST",
        "/api/v1/cohorts",
        422,
        ("body.description",),
        {"json": {"id": "garden", "description": "d" * 1001}},
    ),
    "revoke unknown device": Bad("POST", f"{DEVICES}/cam-nobody/revoke", 404, ("cam-nobody",)),
    "approve approved": Bad(
        "POST", f"/api/v1/models/{APPROVED}/approve", 409, (APPROVED, "candidate"), {"json": {}}
    ),
    "reject approved": Bad(
        "POST", f"/api/v1/models/{APPROVED}/reject", 409, (APPROVED, "candidate"), {"json": {}}
    ),
    "retire candidate": Bad(
        "POST", f"/api/v1/models/{CANDIDATE}/retire", 409, (CANDIDATE, "approved"), {"json": {}}
    ),
    "approve unknown": Bad("POST", "/api/v1/models/nope.v9/approve", 404, ("nope.v9",), {"json": {}}),
    "over-long reason": Bad(
        "POST", f"/api/v1/models/{CANDIDATE}/approve", 422, ("body.reason",), {"json": {"reason": "r" * 1001}}
    ),
    "decision without body": Bad("POST", f"/api/v1/models/{CANDIDATE}/approve", 422, ("body",)),
    "unknown role": Bad("POST", "/api/v1/api-keys", 422, ("body.role",), {"json": {"role": "root"}}),
    "revoke unknown key": Bad("POST", "/api/v1/api-keys/0123456789ab/revoke", 404, ("0123456789ab",)),
    "limit 0": Bad("GET", DEVICES, 422, ("query.limit",), {"params": {"limit": 0}}),
    "limit 10000": Bad("GET", DEVICES, 422, ("query.limit",), {"params": {"limit": 10000}}),
    "limit not a number": Bad("GET", DEVICES, 422, ("query.limit",), {"params": {"limit": "ten"}}),
    "offset -1": Bad("GET", "/api/v1/models", 422, ("query.offset",), {"params": {"offset": -1}}),
    "unknown query parameter": Bad(
        "GET", "/api/v1/jobs", 422, ("query.colour",), {"params": {"colour": "red"}}
    ),
    "repeated query parameter": Bad(
        "GET",
        "/api/v1/telemetry",
        422,
        ("query.model_id", "more than once"),
        {"params": [("model_id", "a.v1"), ("model_id", "b.v1")]},
    ),
    "unknown status": Bad("GET", DEVICES, 422, ("query.status",), {"params": {"status": "asleep"}}),
    "naive since": Bad(
        "GET", "/api/v1/telemetry", 422, ("since", "time zone"), {"params": {"since": "2026-01-01T00:00:00"}}
    ),
    "numeric since": Bad(
        "GET", "/api/v1/telemetry", 422, ("since", "ISO 8601"), {"params": {"since": "0.0"}}
    ),
    "since after until": Bad(
        "GET",
        "/api/v1/telemetry",
        422,
        ("since must be before until",),
        {"params": {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
    ),
    "since equals until": Bad(
        "GET",
        "/api/v1/telemetry",
        422,
        ("since must be before until",),
        {"params": {"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
    ),
    "telemetry limit": Bad("GET", "/api/v1/telemetry", 422, ("query.limit",), {"params": {"limit": 10001}}),
    "bad job uuid": Bad("GET", "/api/v1/jobs/not-a-uuid", 422, ("path.job_id",)),
    "bad rollout uuid": Bad("GET", "/api/v1/rollouts/123/targets", 422, ("path.rollout_id",)),
    "bad knowledge uuid": Bad("GET", "/api/v1/knowledge/not-a-uuid", 422, ("path.msg_id",)),
    "bad job filter uuid": Bad(
        "GET", "/api/v1/knowledge", 422, ("query.job_id",), {"params": {"job_id": "x"}}
    ),
    "oversized body": Bad(
        "POST", "/api/v1/cohorts", 413, ("65536",), {"json": {"id": "garden", "description": "d" * 70_000}}
    ),
}


@pytest.fixture
def fleet(session: Session, store: LocalArtifactStore) -> None:
    """A cohort with one device, an approved and a candidate edge model."""
    make_cohort(session)
    make_device(session, "cam-0001")
    teacher = make_cloud_model(session, store)
    approved = make_edge_model(session, store, teacher_id=teacher.id)
    make_edge_model(session, store, teacher_id=teacher.id)
    decide(session, approved.id, approve=True)
    session.commit()


def counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    """The number of rows in every registry table (the audit log included)."""
    with sessions() as session:
        return {
            t.name: int(session.scalar(select(func.count()).select_from(t)) or 0)
            for t in Base.metadata.sorted_tables
        }


def assert_problem(response: Reply, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    for word in words:
        assert word in body["detail"], body["detail"]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.usefixtures("fleet")
def test_bad_input_gets_a_problem_and_changes_nothing(
    client: TestClient, sessions: sessionmaker[Session], admin: dict[str, str], case: Bad
) -> None:
    # Prepare
    before = counts(sessions)
    headers = {**admin, "Content-Type": "application/json"} if case.method == "POST" else admin

    # Execute
    response = client.request(case.method, case.url, headers=headers, **case.kwargs)

    # Assert
    assert_problem(response, case.status, *case.words)
    assert counts(sessions) == before
    if case.status == 422:
        assert response.json()["errors"][0]["location"]


def chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_an_oversized_chunked_body_gets_413(
    client: TestClient, sessions: sessionmaker[Session], operator: dict[str, str]
) -> None:
    # Prepare: a generator body is sent chunked, without Content-Length
    before = counts(sessions)
    body = b'{"id": "garden", "description": "' + b"d" * 70_000 + b'"}'

    # Execute
    response = client.post(
        "/api/v1/cohorts", content=chunks(body), headers={**operator, "Content-Type": "application/json"}
    )

    # Assert
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "65536")
    assert counts(sessions) == before


def test_a_chunked_body_under_the_limit_is_accepted(client: TestClient, operator: dict[str, str]) -> None:
    # Prepare
    body = b'{"id": "garden", "description": "' + b"d" * 900 + b'"}'

    # Execute
    response = client.post(
        "/api/v1/cohorts", content=chunks(body, 100), headers={**operator, "Content-Type": "application/json"}
    )

    # Assert
    assert response.status_code == 201


@pytest.mark.usefixtures("fleet")
def test_a_duplicate_device_keeps_its_credentials(
    client: TestClient, session: Session, operator: dict[str, str]
) -> None:
    # Prepare
    before = session.get_one(Device, "cam-0001").credential_hash

    # Execute
    response = client.post(DEVICES, json={"id": "cam-0001", "cohort_id": "kitchen"}, headers=operator)

    # Assert
    session.expire_all()
    assert response.status_code == 409
    assert "secret" not in response.text
    assert session.get_one(Device, "cam-0001").credential_hash == before


@pytest.mark.usefixtures("fleet")
def test_a_refused_decision_leaves_the_model_as_it_was(
    client: TestClient, session: Session, operator: dict[str, str]
) -> None:
    # Prepare
    model = session.get_one(Model, APPROVED)
    before = (model.status, model.status_reason, model.decided_at)

    # Execute
    response = client.post(f"/api/v1/models/{APPROVED}/reject", json={"reason": "late"}, headers=operator)

    # Assert
    session.expire_all()
    model = session.get_one(Model, APPROVED)
    assert response.status_code == 409
    assert (model.status, model.status_reason, model.decided_at) == before


NUL_LOOKUPS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "in a path": ("GET", "/api/v1/cohorts/kit%00chen", {}),
    "in a query filter": ("GET", DEVICES, {"params": {"cohort_id": "kit\x00chen"}}),
    "in an audit filter": ("GET", "/api/v1/audit", {"params": {"actor": "key:\x00"}}),
    "in the path of a write": ("POST", "/api/v1/devices/cam%00/revoke", {}),
}
NUL_WRITES: dict[str, tuple[str, dict[str, Any]]] = {
    "in a description": ("/api/v1/cohorts", {"json": {"id": "garden", "description": "a\x00b"}}),
    "in a label": (DEVICES, device(labels={"site": "lab\x00"})),
    "in a reason": (f"/api/v1/models/{CANDIDATE}/reject", {"json": {"reason": "no\x00"}}),
    "in a key name": ("/api/v1/api-keys", {"json": {"role": "viewer", "name": "ci\x00"}}),
}


@pytest.mark.parametrize("where", NUL_LOOKUPS)
@pytest.mark.usefixtures("fleet")
def test_a_nul_character_in_a_lookup_is_not_a_server_error(
    client: TestClient, admin: dict[str, str], where: str
) -> None:
    # Prepare: PostgreSQL cannot take NUL in text (psycopg raises DataError); SQLite can
    method, url, kwargs = NUL_LOOKUPS[where]

    # Execute
    response = client.request(method, url, headers=admin, **kwargs)

    # Assert
    assert response.status_code < 500, response.text


@pytest.mark.parametrize("where", NUL_WRITES)
@pytest.mark.usefixtures("fleet")
def test_a_nul_character_in_a_write_is_refused_on_every_backend(
    client: TestClient, sessions: sessionmaker[Session], admin: dict[str, str], where: str
) -> None:
    # Prepare: PostgreSQL cannot store NUL in text, SQLite would; both must refuse it alike
    url, kwargs = NUL_WRITES[where]
    before = counts(sessions)

    # Execute
    response = client.post(url, headers=admin, **kwargs)

    # Assert
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == PROBLEM
    assert "NUL" in response.json()["detail"]
    assert counts(sessions) == before


@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_a_time_outside_the_utc_range_is_refused(
    client: TestClient, viewer: dict[str, str], since: str
) -> None:
    # Execute: the instant exists in its zone but not in UTC (year 0 or year 10000)
    response = client.get("/api/v1/telemetry", params={"since": since}, headers=viewer)

    # Assert
    assert_problem(response, 422, "since")


@pytest.mark.usefixtures("fleet")
def test_the_same_key_in_different_objects_is_not_a_duplicate(
    client: TestClient, operator: dict[str, str]
) -> None:
    # Prepare: "id" and "cohort_id" again, but inside labels
    body = b'{"id": "cam-0002", "cohort_id": "kitchen", "labels": {"id": "x", "cohort_id": "y"}}'

    # Execute
    response = client.post(
        DEVICES, content=body, headers={**operator, "Content-Type": "application/json; charset=utf-8"}
    )

    # Assert: the route read the body as sent
    assert response.status_code == 201, response.text
    assert response.json()["device"]["labels"] == {"id": "x", "cohort_id": "y"}


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/merge-patch+json"])
@pytest.mark.usefixtures("fleet")
def test_duplicate_keys_are_refused_under_every_json_media_type(
    client: TestClient, sessions: sessionmaker[Session], operator: dict[str, str], content_type: str
) -> None:
    # Prepare
    before = counts(sessions)

    # Execute
    response = client.post(
        "/api/v1/cohorts",
        content=b'{"id": "garden", "description": "a", "description": "b"}',
        headers={**operator, "Content-Type": content_type},
    )

    # Assert
    assert_problem(response, 422, "body.description", "duplicate key 'description'")
    assert response.json()["errors"] == [
        {
            "location": "body.description",
            "message": "duplicate key 'description' in one object (which value was meant?)",
        }
    ]
    assert counts(sessions) == before
