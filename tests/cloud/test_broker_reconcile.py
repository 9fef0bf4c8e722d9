"""The broker as the registry says it should be, on a broker of each test's own (mosquitto, and the
embedded broker) and on both registries: a revocation made while the broker was down is recorded (202,
pending) and applied by the reconciler once the broker is back, which ends the session the device
opened meanwhile; the sweep removes device clients the registry does not hold, repairs device roles,
and flags active devices the broker lost. Also the worker's `reconcile_broker` and `distribute_trust`
tasks, called in-process with the environment's settings."""

from __future__ import annotations

import re
import secrets
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from broker.acl import device_role, provision_commands
from broker.dynsec import DynsecAdmin
from broker.exceptions import BrokerAdminError
from cloud.broker_hook import BrokerCredentialHook, reconcile
from cloud.registry import apikeys
from cloud.registry.devices import broker_failed, get_device, provision_device, revoke_device
from cloud.registry.tables import BrokerSync, Device, DeviceStatus, Role
from cloud.settings import Settings
from cloud.signing import KeyRing
from cloud.worker import tasks
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device, running_mosquitto
from tests.cloud.factories import make_cohort
from tests.embedded_broker import running_embedded_broker
from wire.topics import TRUST_TOPIC, MessageKind, device_topic
from wire.trust import TrustChain

NOT_AUTHORIZED = 0x87
ADMINISTRATIVE_ACTION = 0x98  # mosquitto's DISCONNECT to a session whose client was deleted
MISSING = "the broker has no client for it: provision it again"


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker of this test's own, which it may kill and start again (same port, same state)."""
    state = tmp_path / f"{request.param}-state"
    state.mkdir()
    running = running_mosquitto if request.param == "mosquitto" else running_embedded_broker
    with running(state) as started:
        yield started


@pytest.fixture
def admin(broker: RunningBroker) -> Iterator[DynsecAdmin]:
    with DynsecAdmin(broker.admin, timeout=5) as connected:
        yield connected


@pytest.fixture
def hook(admin: DynsecAdmin) -> BrokerCredentialHook:
    """The hook the API and the worker use, on the test's broker."""
    return BrokerCredentialHook(admin)


@pytest.fixture
def cohort(sessions: sessionmaker[Session]) -> str:
    with sessions() as session, session.begin():
        return make_cohort(session)


def login(broker: RunningBroker, device_id: str, secret: str) -> int | None:
    """The CONNACK reason code a device gets (0: admitted), or None if the broker was not reached."""
    with Probe(broker.as_device(device_id, secret), device_id) as probe:
        reason = probe.connect()
    return None if reason is None else reason.value


def provisioned(
    sessions: sessionmaker[Session], hook: BrokerCredentialHook, device_id: str, cohort: str
) -> str:
    """A device provisioned as the API does it with a broker hook: registry and broker, synced."""
    with sessions() as session, session.begin():
        device, secret = provision_device(session, device_id=device_id, cohort_id=cohort)
        hook.provisioned(device_id, secret)
        device.broker_sync = BrokerSync.synced
    return secret


def row(
    sessions: sessionmaker[Session], device_id: str
) -> tuple[DeviceStatus, BrokerSync | None, str | None]:
    """The device's status and broker columns as the registry holds them now."""
    with sessions() as session:
        device = get_device(session, device_id)
        return device.status, device.broker_sync, device.broker_error


def role_exists(admin: DynsecAdmin, device_id: str) -> bool:
    try:
        admin.execute([{"command": "getRole", "rolename": device_role(device_id)}])
    except BrokerAdminError as exc:
        assert [f.error for f in exc.failures] == ["Role not found"], exc
        return False
    return True


# --- the acceptance test: a revocation while the broker is down -----------------------------------------


def test_a_revocation_made_while_the_broker_was_down_is_applied_once_it_is_back_and_ends_the_new_session(
    broker: RunningBroker,
    engine: Engine,
    sessions: sessionmaker[Session],
    hook: BrokerCredentialHook,
    cohort: str,
    tmp_path: Path,
) -> None:
    # Prepare: the API with the real broker hook; a device provisioned through it logs in with its secret
    from cloud.api.main import create_app

    settings = Settings(
        data_dir=tmp_path / "api",
        database_url=engine.url.render_as_string(hide_password=False),
        api_tune_gc=False,
    )
    with sessions() as session, session.begin():
        _, key = apikeys.create_key(session, role=Role.operator, name="reconcile test")
    operator = {"Authorization": f"Bearer {key}"}
    device = new_device_id("cam")
    with TestClient(create_app(settings, hooks=[hook])) as api:
        created = api.post("/api/v1/devices", json={"id": device, "cohort_id": cohort}, headers=operator)
        assert created.status_code == 201, created.text
        secret = created.json()["secret"]
        admitted = login(broker, device, secret)

        # Execute: the broker goes down, the operator revokes the device, a reconciler pass runs
        broker.kill()
        revoked = api.post(f"/api/v1/devices/{device}/revoke", headers=operator)
        while_down = reconcile(sessions, hook)
        pending = row(sessions, device)

        # ... the broker comes back with the old credentials in its state, and the device logs in again
        broker.start()
        meanwhile = login(broker, device, secret)
        with Probe(broker.as_device(device, secret), device) as session_probe:
            reconnected = session_probe.connect()
            done = reconcile(sessions, hook)
            kicked = session_probe.wait_disconnect()
        after = login(broker, device, secret)
        shown = api.get(f"/api/v1/devices/{device}", headers=operator)
        again = reconcile(sessions, hook)

    # Assert: provisioned and synced, then admitted
    assert created.json()["device"]["broker_sync"] == "synced"
    assert admitted == 0
    # the revocation is recorded first and answered 202, pending, saying why the broker was not told
    assert revoked.status_code == 202, revoked.text
    body = revoked.json()
    assert (body["status"], body["broker_sync"]) == ("revoked", "pending")
    assert body["broker_error"].startswith("broker: ") and str(broker.admin) in body["broker_error"]
    assert re.search(r"not reachable|connection .* dropped", body["broker_error"]), body["broker_error"]
    assert str(broker.admin.password) not in body["broker_error"]
    # a pass while the broker is down applies nothing and keeps the device pending with the new reason
    assert while_down.applied == [] and list(while_down.failed) == [device]
    assert pending == (DeviceStatus.revoked, BrokerSync.pending, while_down.failed[device])
    assert str(broker.admin) in while_down.failed[device]
    # nothing happened by itself when the broker came back: the revoked device still got in
    assert meanwhile == 0
    assert reconnected is not None and reconnected.value == 0
    # the reconciler applied it: the session opened meanwhile is ended, the old secret refused
    assert done.applied == [device] and done.failed == {}
    assert kicked is not None
    if broker.kind == "mosquitto":
        assert kicked.value == ADMINISTRATIVE_ACTION
    assert after == NOT_AUTHORIZED
    assert row(sessions, device) == (DeviceStatus.revoked, BrokerSync.synced, None)
    assert shown.json()["broker_sync"] == "synced" and shown.json()["broker_error"] is None
    # and once applied, it is not applied again
    assert again.applied == [] and again.failed == {}


# --- the sweep ------------------------------------------------------------------------------------------


def test_the_sweep_deletes_device_clients_without_an_active_device_and_only_those(
    broker: RunningBroker,
    sessions: sessionmaker[Session],
    admin: DynsecAdmin,
    hook: BrokerCredentialHook,
    cohort: str,
) -> None:
    # Prepare: an active device; an orphan the registry never knew; a device revoked in the registry
    # alone (the broker was never told, and nothing says it is pending)
    active, orphan, stale = new_device_id("active"), new_device_id("orphan"), new_device_id("stale")
    active_secret = provisioned(sessions, hook, active, cohort)
    orphan_secret = secrets.token_urlsafe(24)
    admin.execute(provision_commands(orphan, orphan_secret))
    stale_secret = provisioned(sessions, hook, stale, cohort)
    with sessions() as session, session.begin():
        revoke_device(session, stale)

    # Execute: a pass without a sweep, then one with it
    plain = reconcile(sessions, hook)
    orphan_before = login(broker, orphan, orphan_secret)
    swept = reconcile(sessions, hook, sweep=True)

    # Assert: only the sweep compares the whole broker; it removed the two and nothing else
    assert (plain.applied, plain.removed) == ([], [])
    assert orphan_before == 0
    assert swept.removed == sorted([orphan, stale])
    assert (swept.applied, swept.failed, swept.repaired, swept.missing) == ([], {}, [], [])
    assert login(broker, orphan, orphan_secret) == NOT_AUTHORIZED
    assert login(broker, stale, stale_secret) == NOT_AUTHORIZED
    assert not role_exists(admin, orphan) and not role_exists(admin, stale)
    assert login(broker, active, active_secret) == 0
    with Probe(broker.cloud, f"cloud-{secrets.token_hex(3)}") as cloud:  # not a device client: kept
        reason = cloud.connect()
        assert reason is not None and reason.value == 0


def test_the_sweep_gives_back_a_device_role_the_acl_it_lost(
    broker: RunningBroker,
    sessions: sessionmaker[Session],
    admin: DynsecAdmin,
    hook: BrokerCredentialHook,
    cohort: str,
) -> None:
    # Prepare: a device whose role lost the grant to subscribe to the trust chain (a role made by an
    # older release); the cloud has a chain retained
    device = new_device_id("cam")
    secret = provisioned(sessions, hook, device, cohort)
    admin.execute(
        [
            {
                "command": "removeRoleACL",
                "rolename": device_role(device),
                "acltype": "subscribeLiteral",
                "topic": TRUST_TOPIC,
            }
        ]
    )
    with Probe(broker.cloud, f"cloud-{secrets.token_hex(3)}") as cloud:
        assert cloud.connect() is not None
        cloud.publish(TRUST_TOPIC, b"the chain", retain=True)
    with Probe(broker.as_device(device, secret), device) as before:
        assert before.connect() is not None
        refused = before.subscribe(TRUST_TOPIC)

    # Execute
    swept = reconcile(sessions, hook, sweep=True)
    again = reconcile(sessions, hook, sweep=True)

    # Assert: refused before; repaired once; then subscribed, and the retained chain is delivered
    assert refused.is_failure
    assert swept.repaired == [device] and swept.removed == [] and swept.missing == []
    assert again.repaired == []
    with Probe(broker.as_device(device, secret), device) as after:
        assert after.connect() is not None
        granted = after.subscribe(TRUST_TOPIC)
        delivered = after.expect_message()
    assert not granted.is_failure
    assert delivered is not None and delivered.payload == b"the chain"


def test_the_sweep_takes_away_a_grant_a_device_role_should_not_have(
    broker: RunningBroker,
    sessions: sessionmaker[Session],
    admin: DynsecAdmin,
    hook: BrokerCredentialHook,
    cohort: str,
) -> None:
    # Prepare: a device whose role was given another device's commands
    device, other = new_device_id("cam"), new_device_id("cam")
    secret = provisioned(sessions, hook, device, cohort)
    foreign = device_topic(other, MessageKind.CMD)
    admin.execute(
        [
            {
                "command": "addRoleACL",
                "rolename": device_role(device),
                "acltype": acltype,
                "topic": foreign,
                "priority": 0,
                "allow": True,
            }
            for acltype in ("subscribeLiteral", "publishClientReceive")
        ]
    )
    with Probe(broker.as_device(device, secret), device) as before:
        assert before.connect() is not None
        granted = before.subscribe(foreign)

    # Execute
    swept = reconcile(sessions, hook, sweep=True)

    # Assert
    assert not granted.is_failure
    assert swept.repaired == [device]
    with Probe(broker.as_device(device, secret), device) as after:
        assert after.connect() is not None
        assert after.subscribe(foreign).is_failure
        assert not after.subscribe(device_topic(device, MessageKind.CMD)).is_failure  # its own still works


def test_the_sweep_repairs_a_grant_that_was_turned_into_a_deny_in_one_pass(
    broker: RunningBroker,
    sessions: sessionmaker[Session],
    admin: DynsecAdmin,
    hook: BrokerCredentialHook,
    cohort: str,
) -> None:
    # Prepare: the device's grant to publish its status replaced by a deny on the same topic
    device = new_device_id("cam")
    provisioned(sessions, hook, device, cohort)
    status, role = device_topic(device, MessageKind.STATUS), device_role(device)
    grant = {"rolename": role, "acltype": "publishClientSend", "topic": status}
    admin.execute(
        [
            {"command": "removeRoleACL", **grant},
            {"command": "addRoleACL", **grant, "priority": 0, "allow": False},
        ]
    )

    # Execute
    swept = reconcile(sessions, hook, sweep=True)

    # Assert
    assert swept.repaired == [device]
    acls = admin.execute([{"command": "getRole", "rolename": role}])[0]["data"]["role"]["acls"]
    assert [a["allow"] for a in acls if a["topic"] == status] == [True]


def test_the_sweep_flags_an_active_device_whose_client_was_deleted_behind_the_registrys_back(
    broker: RunningBroker,
    sessions: sessionmaker[Session],
    admin: DynsecAdmin,
    hook: BrokerCredentialHook,
    cohort: str,
) -> None:
    # Prepare: a managed device whose client an operator deleted in the broker; a device provisioned
    # when no broker was managed (broker_sync null), which the broker never had
    lost, unmanaged = new_device_id("lost"), new_device_id("plain")
    secret = provisioned(sessions, hook, lost, cohort)
    admin.execute([{"command": "deleteClient", "username": lost}])
    with sessions() as session, session.begin():
        provision_device(session, device_id=unmanaged, cohort_id=cohort)

    # Execute
    swept = reconcile(sessions, hook, sweep=True)

    # Assert: flagged (its secret is not stored: it must be provisioned again); the unmanaged one is not
    assert swept.missing == [lost]
    assert (swept.removed, swept.repaired, swept.applied) == ([], [], [])
    assert row(sessions, lost) == (DeviceStatus.active, BrokerSync.pending, MISSING)
    assert row(sessions, unmanaged) == (DeviceStatus.active, None, None)
    assert login(broker, lost, secret) == NOT_AUTHORIZED


def test_a_device_flagged_missing_stays_flagged_while_the_broker_still_lacks_it(
    broker: RunningBroker,
    sessions: sessionmaker[Session],
    admin: DynsecAdmin,
    hook: BrokerCredentialHook,
    cohort: str,
) -> None:
    # Prepare: the sweep flagged a device whose client was deleted (its role is still there)
    lost = new_device_id("lost")
    secret = provisioned(sessions, hook, lost, cohort)
    admin.execute([{"command": "deleteClient", "username": lost}])
    assert reconcile(sessions, hook, sweep=True).missing == [lost]

    # Execute: the next pass (the worker runs one every 15 s, a sweep every 10 minutes)
    later = reconcile(sessions, hook)

    # Assert: the broker still has no client for it, so the registry must keep saying so
    assert login(broker, lost, secret) == NOT_AUTHORIZED
    assert later.applied == []
    assert row(sessions, lost) == (DeviceStatus.active, BrokerSync.pending, MISSING)


# --- the worker's tasks ---------------------------------------------------------------------------------


@dataclass
class Clock:
    """What `tasks.time.monotonic` reads in a test: the sweep's period without waiting for it."""

    now: float = 100_000.0

    def monotonic(self) -> float:
        return self.now


@contextmanager
def worker_context(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, broker: RunningBroker, data_dir: Path
) -> Iterator[Settings]:
    """The tasks' process context made from DIREDI_* variables naming the test's registry and broker;
    its connections closed and the cached context dropped afterwards."""
    monkeypatch.chdir(data_dir.parent)  # no stray .env
    for name in ("DATABASE_URL", "MQTT_URL", "MQTT_ADMIN_URL", "DATA_DIR", "SIGNING_KEY_DIR", "REDIS_URL"):
        monkeypatch.delenv(f"DIREDI_{name}", raising=False)
    monkeypatch.setenv("DIREDI_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DIREDI_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("DIREDI_MQTT_URL", broker.cloud.url())
    monkeypatch.setenv("DIREDI_MQTT_ADMIN_URL", broker.admin.url())
    tasks.context.cache_clear()
    try:
        yield tasks.context().settings
    finally:
        ctx = tasks.context()
        ctx.drop_publisher()
        if ctx.broker_hook is not None:
            ctx.broker_hook.admin.close()
        ctx.sessions.kw["bind"].dispose()
        tasks.context.cache_clear()


def test_the_reconcile_broker_task_applies_pending_revocations_and_sweeps_at_its_period(
    broker: RunningBroker,
    engine: Engine,
    sessions: sessionmaker[Session],
    admin: DynsecAdmin,
    hook: BrokerCredentialHook,
    cohort: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a device revoked while the broker was down (pending), an orphan client, a worker clock
    revoked, orphan, late_orphan = new_device_id("gone"), new_device_id("orphan"), new_device_id("orphan")
    revoked_secret = provisioned(sessions, hook, revoked, cohort)
    with sessions() as session, session.begin():
        revoke_device(session, revoked)
        broker_failed(session, revoked, "broker: down")
    admin.execute(provision_commands(orphan, secrets.token_urlsafe(16)))
    clock = Clock()
    monkeypatch.setattr(tasks, "time", types.SimpleNamespace(monotonic=clock.monotonic))

    with worker_context(monkeypatch, engine, broker, tmp_path / "worker"):
        # Execute: the first pass (a sweep is due); an orphan appears; a pass 1 s later, then one a sweep
        # period later
        first = tasks.reconcile_broker.run()
        after_first = hook.device_clients()
        admin.execute(provision_commands(late_orphan, secrets.token_urlsafe(16)))
        clock.now += 1
        second = tasks.reconcile_broker.run()
        after_second = hook.device_clients()
        clock.now += tasks.BROKER_SWEEP_S
        third = tasks.reconcile_broker.run()
        after_third = hook.device_clients()

    # Assert: the first pass applied the revocation and swept the orphan away
    assert first == 1
    assert login(broker, revoked, revoked_secret) == NOT_AUTHORIZED
    assert row(sessions, revoked) == (DeviceStatus.revoked, BrokerSync.synced, None)
    assert after_first == set()
    # within the sweep period nothing is swept: the orphan made since stays ...
    assert second == 0 and after_second == {late_orphan}
    # ... until the period has passed
    assert third == 0 and after_third == set()


def test_the_reconcile_broker_task_records_why_it_could_not_apply_and_applies_once_the_broker_is_back(
    broker: RunningBroker,
    engine: Engine,
    sessions: sessionmaker[Session],
    hook: BrokerCredentialHook,
    cohort: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a revocation pending, the broker down
    device = new_device_id("gone")
    secret = provisioned(sessions, hook, device, cohort)
    with sessions() as session, session.begin():
        revoke_device(session, device)
        session.execute(update(Device).where(Device.id == device).values(broker_sync=BrokerSync.pending))

    with worker_context(monkeypatch, engine, broker, tmp_path / "worker"):
        broker.kill()
        try:
            # Execute
            down = tasks.reconcile_broker.run()
            while_down = row(sessions, device)
        finally:
            broker.start()
        up = tasks.reconcile_broker.run()

    # Assert: no exception while down, the reason recorded; applied once the broker is back
    assert down == 0
    assert while_down[1] is BrokerSync.pending
    assert while_down[2] is not None and str(broker.admin) in while_down[2]
    assert up == 1
    assert row(sessions, device) == (DeviceStatus.revoked, BrokerSync.synced, None)
    assert login(broker, device, secret) == NOT_AUTHORIZED


def test_distribute_trust_publishes_the_chain_retained_and_activates_a_staged_key_once_every_device_trusts_it(
    broker: RunningBroker,
    engine: Engine,
    sessions: sessionmaker[Session],
    cohort: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a staged key (trust version 2); two active devices on version 1 and a revoked one on none
    ring = KeyRing.open(tmp_path / "worker" / "keys")
    old = ring.active_key_id
    new = ring.stage()
    with sessions() as session, session.begin():
        for name in ("cam-a", "cam-b", "cam-c"):
            device, _ = provision_device(session, device_id=name, cohort_id=cohort)
            device.trust_version = 1
        revoke_device(session, "cam-c").trust_version = None
    reader = new_device_id("cam")
    reader_secret = provisioned_device(broker, reader)
    marker = "diredi/v1/test/marker"

    def report(device_id: str, version: int) -> None:
        with sessions() as session, session.begin():
            session.execute(update(Device).where(Device.id == device_id).values(trust_version=version))

    with worker_context(monkeypatch, engine, broker, tmp_path / "worker"):
        # Execute: a pass with both devices behind, one with one behind, one with none behind
        first = tasks.distribute_trust.run()
        with Probe(broker.cloud, f"watcher-{secrets.token_hex(3)}") as watcher:
            assert watcher.connect() is not None
            assert not watcher.subscribe(TRUST_TOPIC).is_failure
            retained = watcher.expect_message()
            assert not watcher.subscribe(marker).is_failure
            active_after_first = ring.active_key_id
            report("cam-a", 2)
            second = tasks.distribute_trust.run()
            active_after_second = ring.active_key_id
            report("cam-b", 3)
            third = tasks.distribute_trust.run()
            watcher.publish(marker, b"after the passes")
            next_message = watcher.expect_message()
        with Probe(broker.as_device(reader, reader_secret), reader) as as_device:
            assert as_device.connect() is not None
            assert not as_device.subscribe(TRUST_TOPIC).is_failure
            to_device = as_device.expect_message()

    # Assert: the chain of the key ring, published retained, readable by the cloud and by devices
    assert retained is not None and retained.retain
    chain = TrustChain.from_bytes(bytes(retained.payload))
    assert chain == ring.trust_chain()
    assert [d.version for d in chain.documents] == [1, 2] and set(chain.latest.keys) == {old, new}
    assert to_device is not None and TrustChain.from_bytes(bytes(to_device.payload)) == chain
    # each pass returns the trust version; the chain is not published again while it is unchanged
    assert (first, second, third) == (2, 2, 2)
    assert next_message is not None and next_message.topic == marker
    # the staged key signs only once every active device (not the revoked one) reports version >= 2
    assert active_after_first == old and active_after_second == old
    assert ring.active_key_id == new and ring.staged() is None
