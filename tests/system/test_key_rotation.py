"""Key rotation reaches the whole fleet, the acceptance scenario with real parts: mosquitto with the
production configuration, the API (with the broker hook) provisioning two devices, the ingest recording
what they report, and two real device daemons, one of them offline while the new key is staged.

The cloud stages a key and publishes the trust chain; the online device moves to trust version 2 at
once, the offline one from the retained chain when it starts; only then (no device behind) is the key
activated and the old one revoked (version 3). A desired model signed with the revoked key, by a
publisher that kept a copy of it, is refused by both devices naming the unknown key; the same model
signed with the new key is downloaded from the API and installed by both.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from broker.dynsec import DynsecAdmin
from cloud.api.main import create_app
from cloud.artifacts import LocalArtifactStore
from cloud.broker_hook import BrokerCredentialHook
from cloud.ingest.service import Ingest
from cloud.ml.families import NetSpec
from cloud.pipeline.lines import register_line
from cloud.publisher import CloudPublisher
from cloud.registry import apikeys, migrate
from cloud.registry.db import make_engine, session_factory
from cloud.registry.devices import behind_on_trust, create_cohort
from cloud.registry.tables import Device, ModelAck, Role
from cloud.settings import Settings
from cloud.signing import KeyRing
from device_firmware_py.daemon import STATE_FILES
from device_firmware_py.ota import ModelSlots
from tests.brokers import RunningBroker, running_mosquitto
from tests.device.daemons import DaemonProcess
from tests.polling import wait_until
from tests.system.harness import provisioned_daemon, serving

WAIT_S = 30.0  # for what a device does within a second or two; generous for a loaded machine
Ack = tuple[str, str, str, str | None]  # model_id, result, reason, running_model_id


@dataclass
class Fleet:
    """The cloud's parts and two provisioned devices (their daemons not started yet)."""

    broker: RunningBroker
    sessions: sessionmaker[Session]
    ring: KeyRing  # the API's key directory
    provisioned: dict[str, dict[str, Any]]  # the API's answers to POST /devices
    daemons: dict[str, DaemonProcess]

    def trust_version(self, device_id: str) -> int | None:
        """The trust version the device last reported, as the ingest recorded it."""
        with self.sessions() as session:
            return session.scalar(select(Device.trust_version).where(Device.id == device_id))

    def reaches(self, device_id: str, version: int) -> None:
        """Wait until the registry shows `device_id` at trust `version`."""
        wait_until(
            lambda: self.trust_version(device_id) == version,
            WAIT_S,
            lambda: (
                f"{device_id} reports trust {self.trust_version(device_id)}, not {version}:\n"
                + self.daemons[device_id].tail()
            ),
        )

    def acks(self, device_id: str) -> list[Ack]:
        """The device's model acks as the ingest stored them, oldest first."""
        with self.sessions() as session:
            rows = session.execute(
                select(ModelAck.model_id, ModelAck.result, ModelAck.reason, ModelAck.running_model_id)
                .where(ModelAck.device_id == device_id)
                .order_by(ModelAck.sent_at)
            )
            return [(m, str(r.value), reason, running) for m, r, reason, running in rows]

    def wait_acks(self, device_id: str, count: int) -> list[Ack]:
        """Wait until the registry holds `count` acks of the device; return them."""

        def enough() -> list[Ack]:
            acks = self.acks(device_id)
            return acks if len(acks) >= count else []

        return wait_until(
            enough,
            WAIT_S,
            lambda: f"{device_id} acks {self.acks(device_id)}:\n" + self.daemons[device_id].tail(),
        )

    def publish_trust(self) -> None:
        """The cloud publishes the key ring's trust chain, retained, as its service account."""
        with CloudPublisher(self.broker.cloud, self.ring) as publisher:
            publisher.publish_trust(self.ring.trust_chain())


@contextmanager
def running_fleet(root: Path, base_line: Any, small_data: Any, device_ids: list[str]) -> Iterator[Fleet]:
    """A mosquitto of its own, an SQLite registry with the base line's v1, the API (broker hook) over
    HTTP, an ingest, and `device_ids` provisioned through the API; every daemon killed at the end."""
    with ExitStack() as stack:
        (root / "broker").mkdir()
        broker = stack.enter_context(running_mosquitto(root / "broker"))
        settings = Settings(
            data_dir=root / "cloud",
            database_url=f"sqlite:///{root / 'registry.db'}",
            api_tune_gc=False,
        )
        engine = make_engine(settings.resolved_database_url)
        stack.callback(engine.dispose)
        migrate.upgrade(engine)
        sessions = session_factory(engine)
        with sessions() as session, session.begin():
            create_cohort(session, cohort_id=base_line.line)
            register_line(
                session,
                LocalArtifactStore(settings.resolved_artifact_dir),
                base_line,
                NetSpec(num_classes=small_data.num_classes),
            )
            _, key = apikeys.create_key(session, role=Role.operator, name="system test")
        admin = stack.enter_context(DynsecAdmin(broker.admin))
        api_url = stack.enter_context(serving(create_app(settings, hooks=[BrokerCredentialHook(admin)])))
        ingest = Ingest(broker.cloud, sessions, name="system", batch_ms=10)
        ingest.start()
        stack.callback(ingest.stop)
        assert ingest.wait_subscribed(WAIT_S), "the ingest did not subscribe"
        provisioned, daemons = {}, {}
        with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}) as api:
            for device_id in device_ids:
                answer = api.post("/api/v1/devices", json={"id": device_id, "cohort_id": base_line.line})
                assert answer.status_code == 201, answer.text
                provisioned[device_id] = answer.json()
        pool = small_data.users[0].device_train[0]
        for device_id in device_ids:
            daemon = provisioned_daemon(
                root / device_id,
                broker.target,
                provisioned[device_id],
                api_url=api_url,
                stream=(pool.x, pool.y),
            )
            stack.callback(daemon.kill)
            daemons[device_id] = daemon
        yield Fleet(broker, sessions, KeyRing(settings.resolved_signing_key_dir), provisioned, daemons)


def active_model(daemon: DaemonProcess) -> str | None:
    """The model in the device's active slot, read from its state directory."""
    active = ModelSlots(daemon.config.parent / "state" / STATE_FILES["models"]).active()
    return None if active is None else active[1].model_id


def test_a_rotated_key_reaches_online_and_offline_devices_and_the_revoked_key_signs_nothing_they_accept(
    tmp_path: Path, base_line: Any, small_data: Any
) -> None:
    online, offline = "cam-online", "cam-offline"
    model = base_line.artifact.manifest
    with running_fleet(tmp_path, base_line, small_data, [online, offline]) as fleet:
        # Prepare: the online device runs and reports the trust version it was provisioned with
        old = fleet.ring.active_key_id
        fleet.daemons[online].start()
        fleet.reaches(online, 1)

        # Execute: stage a key and publish the chain (a copy of the key ring is kept, old key active)
        new = fleet.ring.stage()
        stolen = KeyRing(Path(shutil.copytree(fleet.ring.directory, tmp_path / "stolen-keys")))
        fleet.publish_trust()
        fleet.reaches(online, 2)
        with fleet.sessions() as session:
            behind_while_offline = behind_on_trust(session, 2)
        # ... the offline device starts later and walks the retained chain
        fleet.daemons[offline].start()
        fleet.reaches(offline, 2)
        with fleet.sessions() as session:
            behind_once_both_trust = behind_on_trust(session, 2)
        # ... now no device is behind: the new key signs, the old one is revoked
        fleet.ring.activate(new)
        fleet.ring.revoke(old)
        fleet.publish_trust()
        for device_id in (online, offline):
            fleet.reaches(device_id, 3)
        # ... the registry offers both the base model; first the holder of the revoked key signs it
        with fleet.sessions() as session, session.begin():
            session.execute(update(Device).values(desired_model_id=model.model_id))
        with CloudPublisher(fleet.broker.cloud, stolen) as forger:
            forged = [forger.publish_desired(device_id, model) for device_id in (online, offline)]
        refused = {device_id: fleet.wait_acks(device_id, 1) for device_id in (online, offline)}
        # ... then the cloud, with its active key
        with CloudPublisher(fleet.broker.cloud, fleet.ring) as publisher:
            genuine = [publisher.publish_desired(device_id, model) for device_id in (online, offline)]
        acks = {device_id: fleet.wait_acks(device_id, 2) for device_id in (online, offline)}
        serving_after = {device_id: active_model(fleet.daemons[device_id]) for device_id in (online, offline)}

    # Assert: both devices were provisioned at trust version 1, trusting the old key alone
    for answer in fleet.provisioned.values():
        assert (answer["trust_version"], answer["trust_threshold"]) == (1, 1)
        assert [(k["key_id"], k["active"]) for k in answer["trusted_keys"]] == [(old, True)]
    # the cloud would not have activated the staged key while the offline device was behind
    assert behind_while_offline == 1 and behind_once_both_trust == 0
    assert fleet.ring.trust().version == 3 and set(fleet.ring.trust().keys) == {new}
    # the forged documents carry the revoked key's id and were refused for that reason, nothing installed
    assert {document.key_id for document in forged} == {old}
    for device_id in (online, offline):
        assert refused[device_id] == [("unknown", "failed", refused[device_id][0][2], None)]
        assert f"signed with unknown key_id {old}" in refused[device_id][0][2]
    # the same model signed with the new key was downloaded from the API and installed by both
    assert {document.key_id for document in genuine} == {new}
    for device_id in (online, offline):
        assert acks[device_id][1] == (model.model_id, "installed", "", model.model_id)
        assert serving_after[device_id] == model.model_id
