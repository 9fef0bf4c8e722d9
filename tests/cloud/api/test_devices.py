"""Devices and cohorts: provisioning with a one-time secret, the broker hook, listing, revocation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.api.main import create_app
from cloud.api.schemas import DevicePublic, Page
from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import HookError
from cloud.registry.devices import revoke_device
from cloud.registry.tables import AuditLog, BrokerSync, Device, Presence
from cloud.settings import Settings
from tests.cloud.api.conftest import basic
from tests.cloud.factories import make_cloud_model, make_cohort, make_device

DEVICES = "/api/v1/devices"
ANY_ARTIFACT = "/api/v1/artifacts/" + "ab" * 32


class RecordingHook:
    """A credential hook that records its calls and can be told to fail, like a broker refusing."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail

    def provisioned(self, device_id: str, secret: str) -> None:
        self.calls.append(("provisioned", device_id, secret))
        if self.fail == "provisioned":
            raise HookError("broker refused the credentials")
        if self.fail == "leaky":  # an unexpected error whose text holds the secret, like a command line
            raise RuntimeError(f"mosquitto_ctrl createClient {device_id} -p {secret} failed")

    def revoked(self, device_id: str, *, certificate: bool = False) -> None:
        self.calls.append(("revoked", device_id))
        if self.fail == "revoked":
            raise RuntimeError("broker unreachable")


@contextmanager
def hooked_client(settings: Settings, hook: RecordingHook) -> Iterator[TestClient]:
    app = create_app(settings, hooks=[hook])
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def provision(client: TestClient, headers: dict[str, str], device_id: str, cohort_id: str = "kitchen") -> str:
    """Provision through the API; return the secret."""
    body = {"id": device_id, "cohort_id": cohort_id, "labels": {"site": "lab-2"}}
    response = client.post(DEVICES, json=body, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["secret"])


def row_count(sessions: sessionmaker[Session], table: type[Device] | type[AuditLog]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def test_provisioning_returns_the_secret_once_and_stores_only_its_hash(
    client: TestClient, session: Session, operator: dict[str, str], viewer: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()

    # Execute
    created = client.post(DEVICES, json={"id": "cam-0001", "cohort_id": "kitchen"}, headers=operator)
    shown = client.get(f"{DEVICES}/cam-0001", headers=viewer)
    listed = client.get(DEVICES, headers=viewer)

    # Assert
    assert created.status_code == 201
    body = created.json()
    secret = body["secret"]
    assert len(secret) >= 40
    assert body["device"]["id"] == "cam-0001"
    assert body["device"]["status"] == "active"
    assert body["trusted_keys"]
    assert [k["active"] for k in body["trusted_keys"]].count(True) == 1
    assert all(k["key_id"] and k["public_key"] for k in body["trusted_keys"])
    for response in (shown, listed):
        assert response.status_code == 200
        assert secret not in response.text
        assert "secret" not in response.text
        assert "credential" not in response.text
    stored = session.get_one(Device, "cam-0001").credential_hash
    assert stored == hashlib.sha256(secret.encode()).hexdigest()


def test_the_signing_keys_are_those_given_at_provisioning(
    client: TestClient, session: Session, operator: dict[str, str], viewer: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    created = client.post(DEVICES, json={"id": "cam-0001", "cohort_id": "kitchen"}, headers=operator)

    # Execute
    keys = client.get("/api/v1/signing-keys", headers=viewer)

    # Assert
    assert keys.json() == created.json()["trusted_keys"]


def test_provisioned_credentials_authenticate_the_device(
    client: TestClient, session: Session, operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    first, second = provision(client, operator, "cam-0001"), provision(client, operator, "cam-0002")

    # Execute
    good = client.get(ANY_ARTIFACT, headers=basic("cam-0001", first))
    crossed = client.get(ANY_ARTIFACT, headers=basic("cam-0001", second))

    # Assert: authenticated (not offered: 404); another device's secret is not this one's
    assert first != second
    assert good.status_code == 404
    assert crossed.status_code == 401


def test_devices_are_listed_by_id_with_filters_and_totals(
    client: TestClient, session: Session, store: LocalArtifactStore, viewer: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    make_cohort(session, "garden")
    devices = [make_device(session, f"cam-{n:04}")[0] for n in range(5)]
    make_device(session, "gnome-01", "garden")
    model = make_cloud_model(session, store)
    devices[1].presence = Presence.online
    devices[2].reported_model_id = model.id
    revoke_device(session, "cam-0004")
    session.commit()

    # Execute
    page = client.get(DEVICES, params={"limit": 2, "offset": 2}, headers=viewer).json()
    kitchen = client.get(DEVICES, params={"cohort_id": "kitchen"}, headers=viewer).json()
    online = client.get(DEVICES, params={"presence": "online"}, headers=viewer).json()
    running = client.get(DEVICES, params={"model_id": model.id}, headers=viewer).json()
    revoked = client.get(DEVICES, params={"status": "revoked"}, headers=viewer).json()
    past_the_end = client.get(DEVICES, params={"offset": 10}, headers=viewer).json()

    # Assert
    assert [d["id"] for d in page["items"]] == ["cam-0002", "cam-0003"]
    assert (page["total"], page["limit"], page["offset"]) == (6, 2, 2)
    assert kitchen["total"] == 5
    assert all(d["cohort_id"] == "kitchen" for d in kitchen["items"])
    assert [d["id"] for d in online["items"]] == ["cam-0001"]
    assert [d["id"] for d in running["items"]] == ["cam-0002"]
    assert running["items"][0]["reported_model_id"] == model.id
    assert [d["id"] for d in revoked["items"]] == ["cam-0004"]
    assert (past_the_end["items"], past_the_end["total"]) == ([], 6)


def test_the_listing_is_exactly_what_its_response_model_would_serialise(
    client: TestClient, session: Session, store: LocalArtifactStore, viewer: dict[str, str]
) -> None:
    # The listing encodes registry rows straight to JSON; it must not drift from Page[DevicePublic].
    # Prepare
    make_cohort(session)
    devices = [make_device(session, f"cam-{n}")[0] for n in range(3)]
    devices[0].presence = Presence.offline
    devices[0].last_seen = datetime(2026, 11, 28, 7, 0, 0, tzinfo=UTC)  # no microseconds
    devices[1].last_seen = datetime(2026, 11, 28, 7, 0, 0, 5, tzinfo=UTC)
    devices[1].labels = {"site": "lab-2", "rack": "ü-7"}
    devices[1].reported_model_id = devices[1].desired_model_id = make_cloud_model(session, store).id
    revoke_device(session, "cam-2")
    session.commit()

    # Execute
    response = client.get(DEVICES, headers=viewer)

    # Assert
    rows = [session.get(Device, d.id) for d in devices]
    expected = Page[DevicePublic].model_validate(
        {"items": rows, "total": 3, "limit": 100, "offset": 0}, from_attributes=True
    )
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected.model_dump(mode="json")
    assert "credential_hash" not in response.text


def test_an_unknown_device_is_404(client: TestClient, viewer: dict[str, str]) -> None:
    # Execute
    response = client.get(f"{DEVICES}/cam-nobody", headers=viewer)

    # Assert
    assert response.status_code == 404
    assert "cam-nobody" in response.json()["detail"]


def test_revoking_ends_the_credentials_and_may_be_repeated(
    client: TestClient, session: Session, operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    secret = provision(client, operator, "cam-0001")

    # Execute
    first = client.post(f"{DEVICES}/cam-0001/revoke", headers=operator)
    after = client.get(ANY_ARTIFACT, headers=basic("cam-0001", secret))
    again = client.post(f"{DEVICES}/cam-0001/revoke", headers=operator)

    # Assert
    assert first.status_code == 200
    assert first.json()["status"] == "revoked"
    assert first.json()["presence"] == "offline"
    assert first.json()["revoked_at"] is not None
    assert after.status_code == 401
    assert again.status_code == 200
    assert again.json()["status"] == "revoked"
    assert again.json()["revoked_at"] == first.json()["revoked_at"]


def test_a_revoked_id_cannot_be_provisioned_again(
    client: TestClient, session: Session, operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    provision(client, operator, "cam-0001")
    client.post(f"{DEVICES}/cam-0001/revoke", headers=operator)

    # Execute
    response = client.post(DEVICES, json={"id": "cam-0001", "cohort_id": "kitchen"}, headers=operator)

    # Assert
    assert response.status_code == 409


SERVICE_LIKE = ["diredi-ingest-1", "diredi-publisher-0a1b2c3d", "diredi-admin-7", "diredi"]


@pytest.mark.parametrize("device_id", SERVICE_LIKE)
def test_a_device_may_not_be_named_like_a_service(
    settings: Settings, session: Session, operator: dict[str, str], device_id: str
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    hook = RecordingHook()

    # Execute
    with hooked_client(settings, hook) as client:
        response = client.post(DEVICES, json={"id": device_id, "cohort_id": "kitchen"}, headers=operator)

    # Assert
    assert response.status_code == 422, response.text
    assert "cloud's own services" in response.text
    assert hook.calls == []
    assert session.get(Device, device_id) is None


def test_the_hook_is_told_of_provisioning_and_every_revocation(
    settings: Settings, session: Session, operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    hook = RecordingHook()

    # Execute
    with hooked_client(settings, hook) as client:
        secret = provision(client, operator, "cam-0001")
        client.post(f"{DEVICES}/cam-0001/revoke", headers=operator)
        client.post(f"{DEVICES}/cam-0001/revoke", headers=operator)

    # Assert
    assert hook.calls == [
        ("provisioned", "cam-0001", secret),
        ("revoked", "cam-0001"),
        ("revoked", "cam-0001"),
    ]


def test_a_failing_provisioning_hook_leaves_no_device(
    settings: Settings, session: Session, sessions: sessionmaker[Session], operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    body = {"id": "cam-0001", "cohort_id": "kitchen"}

    # Execute
    with hooked_client(settings, RecordingHook(fail="provisioned")) as client:
        refused = client.post(DEVICES, json=body, headers=operator)
    devices, audits = row_count(sessions, Device), row_count(sessions, AuditLog)
    with hooked_client(settings, RecordingHook()) as client:
        retried = client.post(DEVICES, json=body, headers=operator)

    # Assert
    assert refused.status_code == 502
    assert refused.headers["content-type"] == "application/problem+json"
    assert "broker" in refused.json()["detail"]
    assert (devices, audits) == (0, 0)
    assert retried.status_code == 201


def test_a_hook_error_never_shows_or_logs_the_secret(
    settings: Settings, session: Session, operator: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    hook = RecordingHook(fail="leaky")

    # Execute
    with hooked_client(settings, hook) as client:
        refused = client.post(DEVICES, json={"id": "cam-0001", "cohort_id": "kitchen"}, headers=operator)

    # Assert
    secret = hook.calls[0][2]
    assert refused.status_code == 502
    assert "RuntimeError" in refused.json()["detail"]
    assert secret not in refused.text
    assert secret not in caplog.text


def test_a_failing_revocation_hook_still_revokes(
    settings: Settings, session: Session, sessions: sessionmaker[Session], operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    make_device(session, "cam-0001")
    session.commit()

    # Execute
    with hooked_client(settings, RecordingHook(fail="revoked")) as client:
        response = client.post(f"{DEVICES}/cam-0001/revoke", headers=operator)

    # Assert: the registry is the source of truth; the broker is still to be told, and the view says so
    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["broker_sync"]) == ("revoked", "pending")
    assert body["broker_error"] == "RuntimeError (details withheld)"
    with sessions() as check:
        device = check.get_one(Device, "cam-0001")
        assert (device.status.value, device.broker_sync) == ("revoked", BrokerSync.pending)
    assert row_count(sessions, AuditLog) == 1


def test_a_revocation_the_broker_took_is_synced(
    settings: Settings, session: Session, sessions: sessionmaker[Session], operator: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()
    hook = RecordingHook()
    with hooked_client(settings, hook) as client:
        provision(client, operator, "cam-0001")

        # Execute
        response = client.post(f"{DEVICES}/cam-0001/revoke", headers=operator)

    # Assert
    assert response.status_code == 200
    assert (response.json()["broker_sync"], response.json()["broker_error"]) == ("synced", None)


def test_cohorts_are_created_listed_and_read(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str]
) -> None:
    # Prepare
    for cohort_id in ("kitchen", "garden", "attic"):
        client.post(
            "/api/v1/cohorts", json={"id": cohort_id, "description": f"{cohort_id} cams"}, headers=operator
        )

    # Execute
    page = client.get("/api/v1/cohorts", params={"limit": 2}, headers=viewer).json()
    one = client.get("/api/v1/cohorts/garden", headers=viewer)
    missing = client.get("/api/v1/cohorts/cellar", headers=viewer)

    # Assert
    assert [c["id"] for c in page["items"]] == ["attic", "garden"]
    assert page["total"] == 3
    assert one.json()["description"] == "garden cams"
    assert missing.status_code == 404


@pytest.mark.parametrize("labels", [{}, {"site": "lab-2", "floor": "3"}])
def test_labels_are_kept(
    client: TestClient, session: Session, operator: dict[str, str], labels: dict[str, str]
) -> None:
    # Prepare
    make_cohort(session)
    session.commit()

    # Execute
    created = client.post(
        DEVICES, json={"id": "cam-0001", "cohort_id": "kitchen", "labels": labels}, headers=operator
    )
    shown = client.get(f"{DEVICES}/cam-0001", headers=operator)

    # Assert
    assert created.json()["device"]["labels"] == labels
    assert shown.json()["labels"] == labels


def test_labels_are_changed_and_devices_selected_by_them(
    client: TestClient, session: Session, operator: dict[str, str], viewer: dict[str, str]
) -> None:
    # Prepare: three devices labelled site=lab (the factory's); two moved to other sites
    make_cohort(session)
    for n in range(3):
        make_device(session, f"cam-{n:04}")
    session.commit()

    # Execute
    moved = client.patch(
        f"{DEVICES}/cam-0001", json={"labels": {"site": "roof", "tier": "beta"}}, headers=operator
    )
    client.patch(f"{DEVICES}/cam-0002", json={"labels": {"site": None, "tier": "ga"}}, headers=operator)

    def ids(selector: str) -> list[str]:
        response = client.get(DEVICES, params={"selector": selector}, headers=viewer)
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()["items"]]

    # Assert: a null removes a label, a value sets one, the others stay; selectors combine with AND
    assert moved.status_code == 200 and moved.json()["labels"] == {"site": "roof", "tier": "beta"}
    assert ids("site=lab") == ["cam-0000"]
    assert ids("site==roof") == ["cam-0001"]
    assert ids("site!=lab") == ["cam-0001", "cam-0002"]  # a device without the label differs too
    assert ids("tier") == ["cam-0001", "cam-0002"]
    assert ids("!site") == ["cam-0002"]
    assert ids("tier, site=roof") == ["cam-0001"]
    assert ids("tier=ga,!site") == ["cam-0002"]
    assert ids("site=nowhere") == []
    audit = session.scalars(select(AuditLog).where(AuditLog.action == "device.label")).all()
    assert [a.target for a in audit] == ["cam-0001", "cam-0002"]


@pytest.mark.parametrize(
    ("selector", "why"),
    [
        ("", "empty term"),
        ("site=lab,", "empty term"),
        ("-site=lab", "label key"),
        ("si te=lab", "label key"),
        ("site=a=b", "no = or !"),
        (",".join(f"k{n}" for n in range(9)), "at most 8 terms"),
        ("x" * 1201, "at most 1200"),
    ],
)
def test_a_selector_that_is_not_one_is_422_with_the_reason(
    client: TestClient, viewer: dict[str, str], selector: str, why: str
) -> None:
    response = client.get(DEVICES, params={"selector": selector}, headers=viewer)

    assert response.status_code == 422
    assert why in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"labels": "site=lab"},
        {"labels": {"site": 3}},
        {"labels": {"site": "x" * 129}},
        {"labels": {f"k{n}": "v" for n in range(33)}},
        {"labels": {}, "cohort_id": "garden"},
    ],
)
def test_a_label_change_that_is_not_one_is_422_and_changes_nothing(
    client: TestClient, session: Session, operator: dict[str, str], body: dict[str, object]
) -> None:
    make_cohort(session)
    make_device(session, "cam-0000")
    session.commit()

    response = client.patch(f"{DEVICES}/cam-0000", json=body, headers=operator)

    assert response.status_code == 422
    session.expire_all()
    assert session.get(Device, "cam-0000").labels == {"site": "lab"}  # type: ignore[union-attr]


def test_labels_past_the_limit_are_refused_and_need_an_operator(
    client: TestClient, session: Session, operator: dict[str, str], viewer: dict[str, str]
) -> None:
    make_cohort(session)
    make_device(session, "cam-0000")
    session.commit()
    many = {f"k{n}": "v" for n in range(32)}  # 32 new ones beside site: 33 in all

    too_many = client.patch(f"{DEVICES}/cam-0000", json={"labels": many}, headers=operator)
    as_viewer = client.patch(f"{DEVICES}/cam-0000", json={"labels": {"a": "b"}}, headers=viewer)
    unknown = client.patch(f"{DEVICES}/cam-9999", json={"labels": {"a": "b"}}, headers=operator)

    assert too_many.status_code == 422 and "at most 32 labels" in too_many.json()["detail"]
    assert as_viewer.status_code == 403
    assert unknown.status_code == 404
