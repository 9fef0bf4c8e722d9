"""Certificate devices end to end on a real mosquitto in certificate mode: the API certifies the device's
own key (no broker state is made), and revoking it puts the certificate on the CRL, reloads the broker
and ends the live session within seconds, also when the broker was down at the time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from cloud.broker_hook import hook_from_settings, hooks_from_settings, reconcile
from cloud.registry import apikeys
from cloud.registry.db import session_factory, transaction
from cloud.registry.tables import Role
from cloud.settings import Settings
from device_firmware_py.identity import device_key, signing_request
from tests.broker.certificates import (
    VERIFY_FAILED,
    Broker,
    Client,
    certificate_broker,
    close,
    connect,
    refusals,
    subscribe,
)
from tests.brokers import CLOUD_USER, new_device_id
from tests.cloud.factories import make_cohort
from tests.device.daemons import DaemonProcess, write_config, write_stream
from tests.polling import wait_until
from wire.topics import MessageKind, device_topic

KICKED_WITHIN_S = 5.0  # the bound for a revoked device to be disconnected and refused


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with certificate_broker(tmp_path_factory.mktemp("revocation")) as running:
        yield running


@dataclass
class Fleet:
    api: TestClient
    settings: Settings
    sessions: sessionmaker[Session]
    operator: dict[str, str]
    work: Path


@pytest.fixture
def fleet(broker: Broker, engine: Engine, tmp_path: Path) -> Iterator[Fleet]:
    """The API on the registry, managing the broker: its admin account, the fleet CA whose CRL the broker
    reads, and the broker's pid file for the reload."""
    from cloud.api.main import create_app

    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{broker.process.pid}\n")
    settings = Settings(
        data_dir=tmp_path,
        database_url=engine.url.render_as_string(hide_password=False),
        mqtt_admin_url=SecretStr(broker.admin.url()),
        mqtt_ca_file=broker.ca_file,
        fleet_ca_dir=broker.ca.directory,
        broker_pid_file=pid_file,
        api_tune_gc=False,
    )
    with transaction(session_factory(engine)) as session:
        make_cohort(session)
        _, key = apikeys.create_key(session, role=Role.operator, name="revocation test")
    sessions = session_factory(engine)
    with TestClient(create_app(settings, hooks=hooks_from_settings(settings, sessions))) as api:
        yield Fleet(api, settings, sessions, {"Authorization": f"Bearer {key}"}, tmp_path)


def provision(fleet: Fleet, device_id: str) -> tuple[Path, Path]:
    """Provision `device_id` by CSR, as the device and the operator do; the device's certificate and key."""
    directory = fleet.work / device_id
    directory.mkdir()
    key = device_key(directory)
    body = {"id": device_id, "cohort_id": "kitchen", "csr": signing_request(key, device_id)}
    answer = fleet.api.post("/api/v1/devices", json=body, headers=fleet.operator)
    assert answer.status_code == 201, answer.text
    (directory / "cert.pem").write_text(answer.json()["certificate"])
    return directory / "cert.pem", directory / "identity.key"


def online(broker: Broker, device_id: str, files: tuple[Path, Path]) -> Client:
    client = connect(broker.device_port, broker.ca_file, cert=files, client_id=device_id)
    assert client.connected.is_set(), client.refused
    return client


def test_a_provisioned_certificate_device_is_admitted_and_the_broker_holds_nothing_of_it(
    broker: Broker, fleet: Fleet
) -> None:
    # Prepare
    device_id = new_device_id()

    # Execute
    files = provision(fleet, device_id)
    client = online(broker, device_id, files)
    shown = fleet.api.get(f"/api/v1/devices/{device_id}", headers=fleet.operator).json()
    with DynsecAdmin(broker.admin) as admin:
        clients = admin.execute([{"command": "listClients"}])[0]["data"]["clients"]

    # Assert: the certificate is the device's; the broker has no client or role for it
    close(client)
    assert shown["cert_sha256"] and shown["cert_not_after"] and shown["broker_sync"] is None
    assert device_id not in clients


def test_a_revoked_device_is_disconnected_and_refused_within_seconds(broker: Broker, fleet: Fleet) -> None:
    # Prepare: a device online, and one that stays
    device_id, other_id = new_device_id(), new_device_id()
    files, other_files = provision(fleet, device_id), provision(fleet, other_id)
    client, other = online(broker, device_id, files), online(broker, other_id, other_files)
    before = refusals(broker)

    # Execute
    revoked = fleet.api.post(f"/api/v1/devices/{device_id}/revoke", headers=fleet.operator)
    wait_until(lambda: bool(client.refused), timeout=KICKED_WITHIN_S, missing="the kick")
    close(client)
    again = connect(broker.device_port, broker.ca_file, cert=files, client_id=device_id)

    # Assert: kicked, refused by the TLS handshake for its certificate; the other device stays online
    try:
        assert revoked.status_code == 200 and revoked.json()["broker_sync"] == "synced", revoked.text
        assert again.refused and refusals(broker)[VERIFY_FAILED] > before[VERIFY_FAILED]
        assert other.connected.is_set() and not other.refused, other.refused
    finally:
        close(again, other)


def test_a_revocation_made_while_the_broker_is_down_holds_when_it_is_back(
    broker: Broker, fleet: Fleet
) -> None:
    # Prepare: a device online, then the broker goes down
    device_id = new_device_id()
    files = provision(fleet, device_id)
    close(online(broker, device_id, files))
    broker.process.stop()
    try:
        # Execute: revoked while the broker is down; it comes back, the reconciler runs
        revoked = fleet.api.post(f"/api/v1/devices/{device_id}/revoke", headers=fleet.operator)
        pending = fleet.api.get(f"/api/v1/devices/{device_id}", headers=fleet.operator).json()
    finally:
        broker.process.start()
    (fleet.work / "mosquitto.pid").write_text(f"{broker.process.pid}\n")
    again = connect(broker.device_port, broker.ca_file, cert=files, client_id=device_id)
    hook = hook_from_settings(fleet.settings, fleet.sessions)
    assert hook is not None
    done = reconcile(fleet.sessions, hook)
    synced = fleet.api.get(f"/api/v1/devices/{device_id}", headers=fleet.operator).json()

    # Assert: pending while the broker was down, refused as soon as it is back, then recorded applied
    close(again)
    assert revoked.status_code == 202 and pending["broker_sync"] == "pending" and pending["broker_error"]
    assert again.refused
    assert done.applied == [device_id] and synced["broker_sync"] == "synced"


def test_a_csr_the_ca_must_not_sign_is_refused_and_no_device_is_made(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: garbage, and a real request that names another device
    key = device_key(tmp_path)
    cases = {"garbage": "not a csr", "another device": signing_request(key, "cam-other")}

    # Execute
    answers = {
        name: fleet.api.post(
            "/api/v1/devices",
            json={"id": f"cam-{name.replace(' ', '-')}", "cohort_id": "kitchen", "csr": csr},
            headers=fleet.operator,
        )
        for name, csr in cases.items()
    }
    listed = fleet.api.get("/api/v1/devices", headers=fleet.operator).json()

    # Assert
    assert {name: a.status_code for name, a in answers.items()} == {"garbage": 422, "another device": 422}
    assert all(a.headers["content-type"] == "application/problem+json" for a in answers.values())
    assert listed["total"] == 0


def test_a_certificate_device_daemon_is_heard_until_it_is_revoked(
    broker: Broker, fleet: Fleet, tmp_path: Path
) -> None:
    # Prepare: a device provisioned by CSR, its daemon configured with the certificate; the cloud listens
    device_id = new_device_id()
    directory = tmp_path / "device"
    directory.mkdir()
    (directory / "state").mkdir(mode=0o700)
    key = device_key(directory / "state")
    body = {"id": device_id, "cohort_id": "kitchen", "csr": signing_request(key, device_id)}
    made = fleet.api.post("/api/v1/devices", json=body, headers=fleet.operator).json()
    (directory / "device.pem").write_text(made["certificate"])
    stream = write_stream(directory / "stream.npz", np.zeros((8, 64), np.float32), np.zeros(8, np.int64))
    target = BrokerTarget("127.0.0.1", broker.device_port, tls=True, ca_file=broker.ca_file)
    trust = {k["key_id"]: k["public_key"] for k in made["trusted_keys"]}
    config = write_config(
        directory, target, device_id, "unused", stream, trust=trust, certificate=directory / "device.pem"
    )
    cloud = connect(
        broker.service.port,
        broker.ca_file,
        client_id=CLOUD_USER,
        login=(str(broker.service.username), str(broker.service.password)),
    )
    subscribe(cloud, device_topic(device_id, MessageKind.STATUS))
    daemon = DaemonProcess(config, directory)
    try:
        # Execute: it runs and reports; then it is revoked
        daemon.start()
        wait_until(
            lambda: bool(cloud.received), timeout=30, missing=f"a status of {device_id}\n{daemon.tail()}"
        )
        fleet.api.post(f"/api/v1/devices/{device_id}/revoke", headers=fleet.operator)
        heard = len(cloud.received)
        before = refusals(broker)[VERIFY_FAILED]
        wait_until(
            lambda: refusals(broker)[VERIFY_FAILED] > before,
            timeout=KICKED_WITHIN_S * 2,
            missing=f"the daemon refused on reconnecting\n{daemon.tail()}",
        )
        after = len(cloud.received)

        # Assert: heard while it was a device of the fleet, refused once it was revoked, still running
        assert heard >= 1 and after <= heard + 1 and daemon.alive()
    finally:
        daemon.terminate()
        close(cloud)
