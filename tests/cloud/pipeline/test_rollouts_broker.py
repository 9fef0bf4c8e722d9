"""The rollout engine with the real CloudPublisher on a real mosquitto: the retained desired models each
device would read, signed and verified with the key ring — the canary first, a failed canary's signed
rollback, an operator's rollback of a whole wave."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from cloud.artifacts import LocalArtifactStore
from cloud.pipeline.rollouts import RolloutPlan, advance_rollouts, request_rollback, start_rollout
from cloud.publisher import CloudPublisher
from cloud.signing import KeyRing
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.cloud.pipeline.rollout_fleet import T0, Fleet, kitchen_fleet, send_acks
from wire.desired import DesiredModel, verify_raw
from wire.messages import AckResult
from wire.topics import MessageKind, device_topic


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing.open(tmp_path / "keys")


@pytest.fixture
def fleet(session: Session, tmp_path: Path) -> Fleet:
    """Three devices of the session's broker (ids no other test uses), on v1 with v2 approved."""
    ids = [new_device_id("roll") for _ in range(3)]
    return kitchen_fleet(session, LocalArtifactStore(tmp_path / "artifacts"), ids)


def retained(broker: RunningBroker, device_id: str, secret: str, ring: KeyRing) -> DesiredModel | None:
    """The desired model the broker keeps for `device_id`, read as the device itself and verified."""
    with Probe(broker.as_device(device_id, secret), device_id) as probe:
        reason = probe.connect()
        assert reason is not None and not reason.is_failure, reason
        topic = device_topic(device_id, MessageKind.MODEL_DESIRED)
        assert not probe.subscribe(topic).is_failure
        # mosquitto sends a subscription's retained message right after its SUBACK, so once a second
        # SUBACK is in, the first subscription's message is too if there is one
        assert not probe.subscribe(topic).is_failure
        message = probe.expect_message(0)
    return None if message is None else verify_raw(bytes(message.payload), ring.trusted())


@dataclass
class Devices:
    """The fleet's devices as broker accounts: what each one reads from its desired topic."""

    broker: RunningBroker
    ring: KeyRing
    secrets: dict[str, str]

    def docs(self) -> list[tuple[str, str | None] | None]:
        """Each device's retained (model, rollback_of), in fleet order."""
        out: list[tuple[str, str | None] | None] = []
        for device_id, secret in self.secrets.items():
            doc = retained(self.broker, device_id, secret, self.ring)
            out.append(None if doc is None else (doc.manifest.model_id, doc.rollback_of))
        return out


@pytest.fixture
def accounts(mosquitto: RunningBroker, fleet: Fleet, ring: KeyRing) -> Devices:
    return Devices(mosquitto, ring, {d: provisioned_device(mosquitto, d) for d in fleet.device_ids})


def test_a_failed_canary_gets_a_signed_rollback_and_no_other_device_hears_of_the_model(
    mosquitto: RunningBroker,
    session: Session,
    sessions: sessionmaker[Session],
    fleet: Fleet,
    ring: KeyRing,
    accounts: Devices,
) -> None:
    # Prepare
    start_rollout(
        session,
        model_id=fleet.v2,
        plan=RolloutPlan(observe_s=0),
        created_by="ops",
        device_ids=fleet.device_ids,
    )
    session.commit()

    with CloudPublisher(mosquitto.cloud, ring) as publisher:
        # Execute: the canary is offered v2, then acks `failed`
        advance_rollouts(sessions, publisher, now=T0)
        offered = accounts.docs()
        send_acks(sessions, fleet.v2, AckResult.failed, fleet.device_ids[0], reason="download failed")
        advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=5))
    rolled_back = accounts.docs()

    # Assert
    assert offered == [(fleet.v2, None), None, None]
    assert rolled_back == [(fleet.v1, fleet.v2), None, None]


def test_waves_reach_the_devices_canary_first_and_an_operator_rollback_reaches_them_all(
    mosquitto: RunningBroker,
    session: Session,
    sessions: sessionmaker[Session],
    fleet: Fleet,
    ring: KeyRing,
    accounts: Devices,
) -> None:
    # Prepare
    rollout = start_rollout(
        session,
        model_id=fleet.v2,
        plan=RolloutPlan(observe_s=0, waves=1),
        created_by="ops",
        device_ids=fleet.device_ids,
    )
    session.commit()
    canary, rest = fleet.device_ids[0], fleet.device_ids[1:]

    with CloudPublisher(mosquitto.cloud, ring) as publisher:
        # Execute: the canary installs; the wave after it is offered; then an operator rolls back
        advance_rollouts(sessions, publisher, now=T0)
        canary_only = accounts.docs()
        send_acks(sessions, fleet.v2, AckResult.installed, canary)
        advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=1))
        everyone = accounts.docs()
        send_acks(sessions, fleet.v2, AckResult.installed, *rest)
        request_rollback(session, rollout.id, requested_by="key:ops", reason="field reports")
        session.commit()
        advance_rollouts(sessions, publisher, now=T0 + timedelta(seconds=2))
    back = accounts.docs()

    # Assert
    assert canary_only == [(fleet.v2, None), None, None]
    assert everyone == [(fleet.v2, None)] * 3
    assert back == [(fleet.v1, fleet.v2)] * 3
