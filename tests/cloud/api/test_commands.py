"""Device commands through the API: stored, published at once to an online device (over the session's
mosquitto), left pending for an offline one, read back; roles, unknown and revoked devices, garbage."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from cloud.api.main import create_app
from cloud.children import free_ports
from cloud.registry import devices
from cloud.registry.tables import AuditLog, CommandState, DeviceCommand, Role
from cloud.settings import Settings
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.cloud.api.conftest import bearer
from tests.cloud.factories import make_cohort, make_device
from wire.messages import Command, CommandName, decode
from wire.topics import MessageKind, device_topic


@pytest.fixture
def settings(engine: Engine, tmp_path: Path, mosquitto: RunningBroker) -> Settings:
    """The API's settings, its broker the session's mosquitto as the cloud's account."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=engine.url.render_as_string(hide_password=False),
        mqtt_url=SecretStr(mosquitto.cloud.url()),
        api_max_body_bytes=64 * 1024,
        api_tune_gc=False,
    )


@pytest.fixture
def device(session: Session, mosquitto: RunningBroker) -> Iterator[tuple[str, Probe]]:
    """A device in the registry and on the broker, connected and subscribed to its commands (offline in
    the registry until a test says otherwise)."""
    device_id = new_device_id("cmd")
    make_cohort(session)
    make_device(session, device_id)
    session.commit()
    probe = Probe(mosquitto.as_device(device_id, provisioned_device(mosquitto, device_id)), device_id)
    reason = probe.connect()
    assert reason is not None and not reason.is_failure, reason
    assert not probe.subscribe(device_topic(device_id, MessageKind.CMD)).is_failure
    with probe:
        yield device_id, probe


def online(session: Session, device_id: str) -> None:
    devices.apply_presence(
        session, device_id, online=True, conn="c1", sent_at=datetime.now().astimezone() - timedelta(seconds=5)
    )
    session.commit()


def post(client: TestClient, device_id: str, headers: dict[str, str], **body: Any) -> Any:
    return client.post(f"/api/v1/devices/{device_id}/commands", json=body, headers=headers)


def test_a_command_to_an_online_device_is_stored_sent_at_once_and_audited(
    client: TestClient, session: Session, device: tuple[str, Probe], operator: dict[str, str]
) -> None:
    # Prepare
    device_id, probe = device
    online(session, device_id)

    # Execute
    reply = post(client, device_id, operator, command="report_now")

    # Assert
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert (body["device_id"], body["command"], body["state"], body["send_count"]) == (
        device_id,
        "report_now",
        "sent",
        1,
    )
    created, expires = datetime.fromisoformat(body["created_at"]), datetime.fromisoformat(body["expires_at"])
    assert expires - created == timedelta(hours=1)
    assert body["requested_by"].startswith("key:") and body["result_msg_id"] is None
    message = probe.expect_message(5.0)
    assert message is not None
    kind, command = decode(message.topic, bytes(message.payload))
    assert kind is MessageKind.CMD and isinstance(command, Command)
    assert (str(command.msg_id), command.command, command.expires_at) == (
        body["id"],
        CommandName.report_now,
        expires,
    )
    audit = session.scalars(select(AuditLog).where(AuditLog.action == "device.command")).one()
    assert (audit.target, audit.detail["command_id"]) == (device_id, body["id"])


def test_a_command_to_an_offline_device_waits_pending_with_its_ttl(
    client: TestClient, device: tuple[str, Probe], operator: dict[str, str]
) -> None:
    # Prepare
    device_id, probe = device

    # Execute
    reply = post(client, device_id, operator, command="run_rd", ttl_s=60)

    # Assert
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert (body["command"], body["state"], body["send_count"], body["sent_at"]) == (
        "run_rd",
        "pending",
        0,
        None,
    )
    created, expires = datetime.fromisoformat(body["created_at"]), datetime.fromisoformat(body["expires_at"])
    assert expires - created == timedelta(seconds=60)
    assert probe.expect_message(1.0) is None


def test_a_broker_that_cannot_be_reached_leaves_the_command_pending(
    settings: Settings, session: Session, device: tuple[str, Probe], keys: dict[Role, str]
) -> None:
    # Prepare: the same registry, a broker URL nobody listens on.
    device_id, _ = device
    online(session, device_id)
    nowhere = settings.model_copy(update={"mqtt_url": SecretStr(f"mqtt://127.0.0.1:{free_ports(1)[0]}")})
    operator = bearer(keys[Role.operator])

    # Execute
    with TestClient(create_app(nowhere), raise_server_exceptions=False) as client:
        reply = post(client, device_id, operator, command="report_now")

    # Assert
    assert reply.status_code == 201, reply.text
    assert (reply.json()["state"], reply.json()["send_count"]) == ("pending", 0)


def test_an_unknown_device_is_404_and_a_revoked_one_409_and_nothing_is_stored(
    client: TestClient, session: Session, device: tuple[str, Probe], operator: dict[str, str]
) -> None:
    # Prepare
    device_id, _ = device
    devices.revoke_device(session, device_id)
    session.commit()

    # Execute
    unknown = post(client, "cam-nobody", operator, command="report_now")
    revoked = post(client, device_id, operator, command="report_now")

    # Assert
    assert unknown.status_code == 404, unknown.text
    assert revoked.status_code == 409, revoked.text
    assert "revoked" in revoked.json()["detail"]
    assert session.scalars(select(DeviceCommand)).all() == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"command": "reboot"},
        {"command": None},
        {"command": "report_now", "ttl_s": 9},
        {"command": "report_now", "ttl_s": 86_401},
        {"command": "report_now", "ttl_s": "3600"},
        {"command": "report_now", "ttl_s": 3600.5},
        {"command": "report_now", "ttl_s": True},
        {"command": "report_now", "ttl_s": 10**30},
        {"command": "report_now", "extra": 1},
        {"command": "report_now\x00"},
        ["report_now"],
        "report_now",
        {"command": "Z" * 10_000},
    ],
)
def test_a_garbage_body_is_422_and_stores_nothing(
    client: TestClient, session: Session, device: tuple[str, Probe], operator: dict[str, str], body: Any
) -> None:
    # Execute
    reply = client.post(f"/api/v1/devices/{device[0]}/commands", json=body, headers=operator)

    # Assert
    assert reply.status_code == 422, reply.text
    assert session.scalars(select(DeviceCommand)).all() == []


def test_a_body_that_is_not_json_is_a_400_problem(
    client: TestClient, device: tuple[str, Probe], operator: dict[str, str]
) -> None:
    # Execute
    reply = client.post(
        f"/api/v1/devices/{device[0]}/commands",
        content=b"\xff{command",
        headers={**operator, "content-type": "application/json"},
    )

    # Assert
    assert reply.status_code == 400, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")


def test_creating_needs_an_operator_and_reading_a_viewer(
    client: TestClient, device: tuple[str, Probe], viewer: dict[str, str], operator: dict[str, str]
) -> None:
    # Prepare
    device_id, _ = device
    path = f"/api/v1/devices/{device_id}/commands"

    # Execute
    as_viewer = post(client, device_id, viewer, command="report_now")
    anonymous = client.post(path, json={"command": "report_now"})
    created = post(client, device_id, operator, command="report_now").json()
    listed = client.get(path, headers=viewer)
    one = client.get(f"{path}/{created['id']}", headers=viewer)
    anonymous_read = client.get(path)

    # Assert
    assert (as_viewer.status_code, anonymous.status_code, anonymous_read.status_code) == (403, 401, 401)
    assert listed.status_code == 200 and [c["id"] for c in listed.json()["items"]] == [created["id"]]
    assert one.status_code == 200 and one.json() == created


def test_a_devices_commands_are_listed_newest_first_in_pages_and_filtered_by_state(
    client: TestClient,
    session: Session,
    device: tuple[str, Probe],
    operator: dict[str, str],
    viewer: dict[str, str],
) -> None:
    # Prepare
    device_id, _ = device
    ids = [post(client, device_id, operator, command="report_now").json()["id"] for _ in range(3)]
    session.execute(
        update(DeviceCommand).where(DeviceCommand.id == uuid.UUID(ids[0])).values(state=CommandState.done)
    )
    session.commit()
    path = f"/api/v1/devices/{device_id}/commands"

    # Execute
    first = client.get(path, params={"limit": 2}, headers=viewer).json()
    second = client.get(path, params={"limit": 2, "offset": 2}, headers=viewer).json()
    done = client.get(path, params={"state": "done"}, headers=viewer).json()

    # Assert
    assert first["total"] == 3
    assert [c["id"] for c in first["items"] + second["items"]] == ids[::-1]
    assert [c["id"] for c in done["items"]] == [ids[0]]


@pytest.mark.parametrize(
    ("suffix", "status"),
    [
        ("/commands", 404),  # an unknown device
        ("/commands/not-a-uuid", 422),
        ("/commands?state=bogus", 422),
        ("/commands?limit=0", 422),
        ("/commands?limit=1&limit=2", 422),
        ("/commands?unknown=1", 422),
    ],
)
def test_reads_of_garbage_are_refused(
    client: TestClient, device: tuple[str, Probe], viewer: dict[str, str], suffix: str, status: int
) -> None:
    # Prepare
    device_id = "cam-nobody" if status == 404 else device[0]

    # Execute
    reply = client.get(f"/api/v1/devices/{device_id}{suffix}", headers=viewer)

    # Assert
    assert reply.status_code == status, reply.text


def test_another_devices_command_or_an_unknown_one_is_404(
    client: TestClient,
    session: Session,
    device: tuple[str, Probe],
    operator: dict[str, str],
    viewer: dict[str, str],
) -> None:
    # Prepare
    device_id, _ = device
    make_device(session, "cam-other")
    session.commit()
    created = post(client, device_id, operator, command="report_now").json()

    # Execute
    other = client.get(f"/api/v1/devices/cam-other/commands/{created['id']}", headers=viewer)
    unknown = client.get(f"/api/v1/devices/{device_id}/commands/{uuid.uuid4()}", headers=viewer)

    # Assert
    assert (other.status_code, unknown.status_code) == (404, 404)
