"""The dynamic-security admin client and the API's broker credential hook, against the real mosquitto."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine

from broker import dynsec
from broker.acl import device_role, provision_commands
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.exceptions import BrokerAdminError, BrokerURLError
from cloud.broker_hook import BrokerCredentialHook, hooks_from_settings
from cloud.children import free_ports
from cloud.exceptions import HookError
from cloud.registry import apikeys
from cloud.registry.db import session_factory, transaction
from cloud.registry.tables import Role
from cloud.settings import Settings
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.cloud.factories import make_cohort
from tests.polling import wait_until

NOT_AUTHORIZED = 0x87


@pytest.fixture
def admin(mosquitto: RunningBroker) -> Iterator[DynsecAdmin]:
    with DynsecAdmin(mosquitto.admin, timeout=5) as connected:
        yield connected


@pytest.fixture
def hook(admin: DynsecAdmin) -> BrokerCredentialHook:
    return BrokerCredentialHook(admin)


def login(broker: RunningBroker, device_id: str, secret: str) -> int | None:
    """The CONNACK reason code a device gets (0: admitted), or None if the broker was not reached."""
    with Probe(broker.as_device(device_id, secret), device_id) as probe:
        reason = probe.connect()
    return None if reason is None else reason.value


def unreachable(target: BrokerTarget) -> BrokerTarget:
    """The same account on a loopback port nobody listens on."""
    return dataclasses.replace(target, port=free_ports(1)[0])


# --- DynsecAdmin ---------------------------------------------------------------------------------------


def test_execute_answers_every_command_in_order(mosquitto: RunningBroker, admin: DynsecAdmin) -> None:
    # Prepare
    assert mosquitto.cloud.username is not None and mosquitto.admin.username is not None
    names = [mosquitto.cloud.username, mosquitto.admin.username]

    # Execute
    results = admin.execute([{"command": "getClient", "username": name} for name in names])

    # Assert
    assert [r["command"] for r in results] == ["getClient", "getClient"]
    assert [r["data"]["client"]["username"] for r in results] == names
    assert all("correlationData" not in r for r in results)
    assert admin.execute([]) == []


def test_a_duplicate_device_is_refused_without_showing_its_secret(
    mosquitto: RunningBroker, admin: DynsecAdmin
) -> None:
    # Prepare
    device = new_device_id()
    provisioned_device(mosquitto, device)
    secret = secrets.token_urlsafe(24)

    # Execute
    with pytest.raises(BrokerAdminError) as raised:
        admin.execute(provision_commands(device, secret))

    # Assert
    error = raised.value
    assert secret not in str(error) and secret not in repr(error)
    assert f"createClient {device}: Client already exists" in str(error)
    assert [f.command for f in error.failures] == ["createRole", "createClient"]
    assert [f.subject for f in error.failures] == [device_role(device), device]
    assert len(error.results) == 2 and error.sent


def test_a_refused_command_does_not_stop_the_others(admin: DynsecAdmin) -> None:
    # Prepare
    role = new_device_id("role")

    # Execute
    with pytest.raises(BrokerAdminError) as raised:
        admin.execute(
            [{"command": "deleteRole", "rolename": role}, {"command": "createRole", "rolename": role}]
        )

    # Assert
    assert [("error" in r) for r in raised.value.results] == [True, False]
    assert str(raised.value).endswith(f"refused deleteRole {role}: Role not found")
    assert admin.execute([{"command": "deleteRole", "rolename": role}]) == [{"command": "deleteRole"}]


def test_a_wrong_admin_password_is_an_error_that_does_not_show_it(mosquitto: RunningBroker) -> None:
    # Prepare
    assert mosquitto.admin.username is not None
    password = secrets.token_urlsafe(16)
    wrong = mosquitto.admin.with_credentials(mosquitto.admin.username, password)

    # Execute
    with pytest.raises(BrokerAdminError) as raised:
        DynsecAdmin(wrong, timeout=3).execute([{"command": "listClients"}])

    # Assert
    assert "refused the admin login (Not authorized)" in str(raised.value)
    assert password not in str(raised.value) and password not in repr(raised.value)
    assert str(mosquitto.admin.password) not in str(raised.value)
    assert not raised.value.sent


def test_an_unreachable_broker_is_an_error_at_once(mosquitto: RunningBroker) -> None:
    # Prepare
    started = time.monotonic()

    # Execute
    with pytest.raises(BrokerAdminError, match="not reachable") as raised:
        DynsecAdmin(unreachable(mosquitto.admin), timeout=5).execute([{"command": "listClients"}])

    # Assert
    assert time.monotonic() - started < 2
    assert str(mosquitto.admin.password) not in str(raised.value)


def test_a_missing_ca_file_is_an_admin_error(mosquitto: RunningBroker, tmp_path: Path) -> None:
    # Prepare
    assert mosquitto.tls is not None
    assert mosquitto.admin.username is not None and mosquitto.admin.password is not None
    target = dataclasses.replace(mosquitto.tls, ca_file=tmp_path / "missing.crt")
    admin = target.with_credentials(mosquitto.admin.username, mosquitto.admin.password)

    # Execute
    with pytest.raises(BrokerAdminError, match="FileNotFoundError") as raised:
        DynsecAdmin(admin, timeout=3).execute([{"command": "listClients"}])

    # Assert
    assert "missing.crt" in str(raised.value) and mosquitto.admin.password not in str(raised.value)


def test_the_admin_works_over_tls(mosquitto: RunningBroker) -> None:
    # Prepare
    assert mosquitto.tls is not None
    assert mosquitto.admin.username is not None and mosquitto.admin.password is not None
    admin = mosquitto.tls.with_credentials(mosquitto.admin.username, mosquitto.admin.password)

    # Execute
    with DynsecAdmin(admin, timeout=3) as connected:
        results = connected.execute([{"command": "listRoles"}])

    # Assert
    assert results[0]["command"] == "listRoles"


def test_an_account_without_admin_rights_cannot_administer(mosquitto: RunningBroker) -> None:
    # Execute
    with pytest.raises(BrokerAdminError, match="may not read the responses"):
        DynsecAdmin(mosquitto.cloud, timeout=3).execute([{"command": "listClients"}])


def test_a_command_nobody_answers_times_out(
    mosquitto: RunningBroker, admin: DynsecAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a control topic the plugin does not serve
    monkeypatch.setattr(dynsec, "CONTROL_TOPIC", "$CONTROL/dynamic-security/v0")

    # Execute
    with pytest.raises(BrokerAdminError, match=r"did not answer listClients within 0.3 s") as raised:
        admin.execute([{"command": "listClients"}], timeout=0.3)

    # Assert
    assert raised.value.sent  # it may have run: the hook undoes a provisioning in doubt


def test_admins_sharing_an_account_each_get_their_own_answers(mosquitto: RunningBroker) -> None:
    # Prepare: two API processes, say, with the same admin account
    devices = [new_device_id() for _ in range(6)]
    for device in devices:
        provisioned_device(mosquitto, device)

    def look_up(admin: DynsecAdmin) -> list[str]:
        answers = []
        for _ in range(10):
            for device in devices:
                result = admin.execute([{"command": "getClient", "username": device}])
                answers.append(result[0]["data"]["client"]["username"])
        return answers

    # Execute
    with DynsecAdmin(mosquitto.admin) as one, DynsecAdmin(mosquitto.admin) as two:
        with ThreadPoolExecutor(2) as pool:
            answered = list(pool.map(look_up, [one, two]))

    # Assert
    assert answered == [devices * 10, devices * 10]


def test_one_admin_is_safe_to_share_between_threads(mosquitto: RunningBroker, admin: DynsecAdmin) -> None:
    # Prepare
    devices = [new_device_id("thread") for _ in range(24)]

    # Execute
    with ThreadPoolExecutor(8) as pool:
        secrets_by_device = dict(
            zip(devices, pool.map(lambda d: provisioned_by(admin, d), devices), strict=True)
        )

    # Assert
    listed = admin.execute([{"command": "listClients"}])[0]["data"]["clients"]
    assert set(devices) <= set(listed)
    device = devices[-1]
    assert login(mosquitto, device, secrets_by_device[device]) == 0


def provisioned_by(admin: DynsecAdmin, device_id: str) -> str:
    secret = secrets.token_urlsafe(16)
    admin.execute(provision_commands(device_id, secret))
    return secret


def test_the_admin_reconnects_after_its_connection_was_taken_over(mosquitto: RunningBroker) -> None:
    # Prepare
    client_id = new_device_id("admin")
    with DynsecAdmin(mosquitto.admin, client_id=client_id) as admin:
        admin.execute([{"command": "listRoles"}])
        with Probe(mosquitto.admin, client_id) as thief:  # the same client id takes the session over
            assert thief.connect() is not None
            # the broker's DISCONNECT reaches the admin's network thread in its own time
            wait_until(lambda: not admin._ready, 30, "the admin never noticed its session taken over")

            # Execute
            results = admin.execute([{"command": "listRoles"}])

    # Assert
    assert results[0]["command"] == "listRoles"


def test_the_admin_reconnects_after_a_broker_restart_and_credentials_survive_a_kill(
    mosquitto: RunningBroker, admin: DynsecAdmin
) -> None:
    # Prepare
    device = new_device_id()
    secret = provisioned_by(admin, device)

    # Execute
    mosquitto.kill()
    try:
        with pytest.raises(BrokerAdminError):
            admin.execute([{"command": "listClients"}], timeout=2)
    finally:
        mosquitto.start()
    clients = admin.execute([{"command": "listClients"}])[0]["data"]["clients"]

    # Assert: dynamic security writes its file on every change, so a SIGKILL loses nothing
    assert device in clients
    assert login(mosquitto, device, secret) == 0


# --- BrokerCredentialHook ------------------------------------------------------------------------------


def test_the_hook_provisions_a_device_that_can_then_connect(
    mosquitto: RunningBroker, hook: BrokerCredentialHook
) -> None:
    # Prepare
    device, secret = new_device_id(), secrets.token_urlsafe(24)

    # Execute
    hook.provisioned(device, secret)

    # Assert
    assert login(mosquitto, device, secret) == 0


def test_the_hook_refuses_a_duplicate_and_leaves_the_existing_device_alone(
    mosquitto: RunningBroker, hook: BrokerCredentialHook
) -> None:
    # Prepare
    device = new_device_id()
    original = provisioned_device(mosquitto, device)
    secret = secrets.token_urlsafe(24)

    # Execute
    with pytest.raises(HookError) as raised:
        hook.provisioned(device, secret)

    # Assert
    assert "Client already exists" in str(raised.value)
    assert secret not in str(raised.value)
    assert login(mosquitto, device, original) == 0
    assert login(mosquitto, device, secret) == NOT_AUTHORIZED


def test_the_hook_undoes_half_a_provisioning(
    mosquitto: RunningBroker, admin: DynsecAdmin, hook: BrokerCredentialHook
) -> None:
    # Prepare: a stray role of the same name, so that only the client gets created
    device = new_device_id()
    admin.execute([{"command": "createRole", "rolename": device_role(device)}])
    secret = secrets.token_urlsafe(24)

    # Execute
    with pytest.raises(HookError, match="Role already exists"):
        hook.provisioned(device, secret)

    # Assert: the client it did create is gone again; the role it did not create is still there
    assert login(mosquitto, device, secret) == NOT_AUTHORIZED
    assert admin.execute([{"command": "getRole", "rolename": device_role(device)}])[0]["command"] == "getRole"


def test_the_hook_revocation_ends_the_live_session_and_refuses_the_next(
    mosquitto: RunningBroker, hook: BrokerCredentialHook
) -> None:
    # Prepare
    device = new_device_id()
    secret = provisioned_device(mosquitto, device)
    with Probe(mosquitto.as_device(device, secret), device) as probe:
        assert probe.connect() is not None

        # Execute
        hook.revoked(device)

        # Assert: mosquitto 2 kicks the deleted client's session at once
        kicked = probe.wait_disconnect()
    assert kicked is not None and kicked.value == 0x98  # "administrative action"
    assert login(mosquitto, device, secret) == NOT_AUTHORIZED


def test_the_hook_revokes_idempotently(mosquitto: RunningBroker, hook: BrokerCredentialHook) -> None:
    # Prepare
    device = new_device_id()
    provisioned_device(mosquitto, device)
    hook.revoked(device)

    # Execute
    hook.revoked(device)
    hook.revoked(new_device_id("never"))

    # Assert: no error, and the name can be provisioned anew
    assert login(mosquitto, device, provisioned_device(mosquitto, device)) == 0


def test_the_hook_reports_an_unreachable_broker_safely(mosquitto: RunningBroker) -> None:
    # Prepare
    hook = BrokerCredentialHook(DynsecAdmin(unreachable(mosquitto.admin), timeout=2))
    secret = secrets.token_urlsafe(24)

    # Execute
    with pytest.raises(HookError) as provisioning:
        hook.provisioned(new_device_id(), secret)
    with pytest.raises(HookError) as revoking:
        hook.revoked(new_device_id())

    # Assert
    for raised in (provisioning, revoking):
        assert "not reachable" in str(raised.value)
        assert secret not in str(raised.value) and str(mosquitto.admin.password) not in str(raised.value)


def test_hooks_from_settings_needs_the_admin_url(tmp_path: Path) -> None:
    # Prepare
    url = "mqtts://admin:pw@broker.example:8883"

    # Execute
    without = hooks_from_settings(Settings(data_dir=tmp_path))
    with_url = hooks_from_settings(
        Settings(data_dir=tmp_path, mqtt_admin_url=SecretStr(url), mqtt_ca_file=tmp_path / "ca.crt")
    )

    # Assert
    assert without == []
    assert len(with_url) == 1 and isinstance(with_url[0], BrokerCredentialHook)
    target = with_url[0].admin.target
    assert (target.host, target.port, target.tls, target.ca_file) == (
        "broker.example",
        8883,
        True,
        tmp_path / "ca.crt",
    )
    with pytest.raises(BrokerURLError):
        hooks_from_settings(Settings(data_dir=tmp_path, mqtt_admin_url=SecretStr("http://admin:pw@x")))


def test_the_api_server_builds_its_app_with_the_broker_hook(
    mosquitto: RunningBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    from cloud.cli.ops import api_app

    monkeypatch.setenv("DIREDI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DIREDI_MQTT_ADMIN_URL", mosquitto.admin.url())

    # Execute
    hooks = api_app().state.services.hooks
    monkeypatch.delenv("DIREDI_MQTT_ADMIN_URL")
    none = api_app().state.services.hooks

    # Assert
    assert [type(h) for h in hooks] == [BrokerCredentialHook] and none == []


def test_the_api_provisions_and_revokes_devices_in_the_broker(
    mosquitto: RunningBroker, engine: Engine, tmp_path: Path
) -> None:
    # Prepare
    from cloud.api.main import create_app

    settings = Settings(
        data_dir=tmp_path,
        database_url=engine.url.render_as_string(hide_password=False),
        mqtt_admin_url=SecretStr(mosquitto.admin.url()),
        api_tune_gc=False,
    )
    with transaction(session_factory(engine)) as session:
        make_cohort(session)
        _, key = apikeys.create_key(session, role=Role.operator, name="broker test")
    operator = {"Authorization": f"Bearer {key}"}
    device, taken = new_device_id(), new_device_id()
    provisioned_device(mosquitto, taken)  # known to the broker, not to the registry

    with TestClient(create_app(settings, hooks=hooks_from_settings(settings))) as api:
        # Execute
        created = api.post("/api/v1/devices", json={"id": device, "cohort_id": "kitchen"}, headers=operator)
        refused = api.post("/api/v1/devices", json={"id": taken, "cohort_id": "kitchen"}, headers=operator)
        secret = created.json()["secret"]
        with Probe(mosquitto.as_device(device, secret), device) as probe:
            admitted = probe.connect()
            revoked = api.post(f"/api/v1/devices/{device}/revoke", headers=operator)
            kicked = probe.wait_disconnect()
        missing = api.get(f"/api/v1/devices/{taken}", headers=operator)

    # Assert
    assert created.status_code == 201 and admitted is not None and admitted.value == 0
    assert revoked.status_code == 200 and kicked is not None
    assert login(mosquitto, device, secret) == NOT_AUTHORIZED
    assert refused.status_code == 502 and "Client already exists" in refused.json()["detail"]
    assert missing.status_code == 404  # the broker refused it, so the registry did not keep it
