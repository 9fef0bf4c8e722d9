"""Model acks: what devices say of the desired models they were sent, stored once per msg_id, with the
device's reported model and its rollout target brought up to date (and flagged for the beat)."""

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud.registry.common import insert_new
from cloud.registry.devices import report_model
from cloud.registry.rollouts import OPEN_ROLLOUTS
from cloud.registry.tables import (
    ModelAck,
    Rollout,
    RolloutState,
    RolloutTarget,
    TargetState,
)
from wire.messages import AckResult
from wire.messages import ModelAck as AckMessage

# A completed (or stopped) rollout still waits for the devices that were offline when it was offered to
# them: they get the retained desired model when they come back, and their late ack ends their target.
ACKED_ROLLOUTS = (*OPEN_ROLLOUTS, RolloutState.completed, RolloutState.stopped)


def record_acks(session: Session, acks: Sequence[AckMessage], *, received_at: datetime) -> set[uuid.UUID]:
    """Store each ack once; for the new ones, move the device's target in an open or completed rollout of
    that model (pending or offered → installed, failed or rolled_back) and record the model the device
    now runs.
    Return the msg_ids that were new. The devices must exist (the ingest checks)."""
    rows = [
        {
            "msg_id": ack.msg_id,
            "device_id": ack.device_id,
            "model_id": ack.model_id,
            "result": ack.result,
            "reason": ack.reason,
            "running_model_id": ack.running_model_id,
            "sent_at": ack.sent_at,
            "received_at": received_at,
        }
        for ack in acks
    ]
    new = insert_new(session, ModelAck, rows, key="msg_id")
    for ack in sorted((a for a in acks if a.msg_id in new), key=lambda a: a.sent_at):
        rollouts = select(Rollout.id).where(
            Rollout.model_id == ack.model_id, Rollout.state.in_(ACKED_ROLLOUTS)
        )
        session.execute(
            update(RolloutTarget)
            .where(
                RolloutTarget.device_id == ack.device_id,
                RolloutTarget.rollout_id.in_(rollouts),
                RolloutTarget.state.in_((TargetState.pending, TargetState.offered)),
            )
            # `changed` tells the beat's next pass there is news of this rollout (cloud/pipeline/rollouts.py).
            .values(state=TargetState(ack.result.value), reason=ack.reason, changed=True)
        )
        running = ack.model_id if ack.result is AckResult.installed else ack.running_model_id
        if running is not None:
            report_model(session, ack.device_id, running)
    return new
