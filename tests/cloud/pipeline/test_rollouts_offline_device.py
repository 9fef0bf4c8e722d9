"""A device offline during a rollout gets the model when it comes back: the engine offers it v2 (a
retained, signed desired model on a real mosquitto) and moves on without it; the real daemon starts
only then, downloads v2 from the real `diredi api` with its own credentials, installs and acks it, and
the real ingest ends its target in the completed rollout as `installed` (PostgreSQL registry)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloud.pipeline.rollouts import RolloutPlan, advance_rollouts, start_rollout
from cloud.publisher import CloudPublisher
from cloud.registry import devices, models
from cloud.registry.tables import (
    Device,
    ModelStatus,
    Rollout,
    RolloutState,
    RolloutTarget,
    TargetState,
    utcnow,
)
from tests.cloud.pipeline.rollout_fleet import send_acks
from tests.device.artifacts import make_v2
from tests.device.test_daemon_ota import Cloud, api, cloud, site  # noqa: F401 - fixtures: the registry, `diredi api`
from tests.polling import wait_until
from wire.messages import AckResult


@pytest.fixture(scope="session")
def v2(base_line: Any, small_data: Any) -> Any:
    """Version 2 of the base line (the `cloud` fixture registers it as a candidate)."""
    return make_v2(base_line, small_data)


def target_state(registry: Cloud, rollout_id: uuid.UUID, device_id: str) -> TargetState:
    with registry.sessions() as session:
        return session.get_one(RolloutTarget, (rollout_id, device_id)).state


def test_a_device_offline_during_the_rollout_installs_the_model_when_it_returns(
    tmp_path: Path,
    cloud: Cloud,  # noqa: F811
    api: str,  # noqa: F811
    base_line: Any,
    small_data: Any,
    v2: Any,
) -> None:
    late, canary = f"cam-{uuid.uuid4().hex[:8]}", f"cam-{uuid.uuid4().hex[:8]}"
    v1_id, v2_id = base_line.model_id, v2.manifest.model_id
    with site(tmp_path, cloud, base_line, small_data, device_id=late, api_url=api) as device:
        # Prepare: v2 approved; a canary and the late device, both on v1, in a rollout of v2
        with cloud.sessions() as session, session.begin():
            if models.get_model(session, v2_id).status is ModelStatus.candidate:
                models.decide(session, v2_id, approve=True)
            devices.provision_device(session, device_id=canary, cohort_id=base_line.line)
            for device_id in (canary, late):
                devices.report_model(session, device_id, v1_id)
            plan = RolloutPlan(canary=1, waves=1, observe_s=0, wave_timeout_s=60)
            rollout_id = start_rollout(
                session, model_id=v2_id, plan=plan, created_by="test", device_ids=[canary, late]
            ).id
        now = utcnow()

        # Execute: the canary installs; the late device is offered v2 while its daemon is down, and the
        # rollout completes without it once the wave times out
        with CloudPublisher(device.broker.cloud, cloud.ring) as publisher:
            advance_rollouts(cloud.sessions, publisher, now=now)
            send_acks(cloud.sessions, v2_id, AckResult.installed, canary)
            advance_rollouts(cloud.sessions, publisher, now=now + timedelta(seconds=1))
            offered_while_down = target_state(cloud, rollout_id, late)
            advance_rollouts(cloud.sessions, publisher, now=now + timedelta(seconds=62))
        with cloud.sessions() as session:
            state_before_return = session.get_one(Rollout, rollout_id).state
        device.daemon.start()
        wait_until(
            lambda: target_state(cloud, rollout_id, late) is TargetState.installed,
            120,
            lambda: (
                f"the late device's target is {target_state(cloud, rollout_id, late).value}:\n"
                f"{device.daemon.tail()}"
            ),
        )
        acks = device.acks(cloud.sessions)
        exit_code = device.daemon.terminate()

        # Assert
        assert offered_while_down is TargetState.offered
        assert state_before_return is RolloutState.completed
        assert acks == [(v2_id, "installed")]
        assert device.active_model() == v2_id
        assert exit_code == 0
        with cloud.sessions() as session:
            reported = session.scalar(select(Device.reported_model_id).where(Device.id == late))
        assert reported == v2_id
