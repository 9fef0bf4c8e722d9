"""One ingest batch into the registry, in one transaction: telemetry, knowledge reports, model acks,
command results, presence and `last_seen` — each message stored once by its msg_id.

What may not be stored (a device the registry does not know or has revoked, a report whose base model
is not its cohort's) is refused with the reason, and the rest of the batch is still written. The
caller sends receipts only for what `write` returned, and only after it returned (committed).
"""

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cloud.exceptions import CloudError
from cloud.registry import acks, commands, knowledge, telemetry
from cloud.registry.devices import (
    KnownDevice,
    PresenceUpdate,
    apply_presences,
    existing_models,
    known_devices,
    mark_seen,
    report_model,
    report_trust,
)
from cloud.registry.tables import DeviceStatus, utcnow
from wire.errors import ContractError, Rejection
from wire.fastpath import StatusRecord
from wire.knowledge import KnowledgeReport
from wire.messages import CommandResult, Message, ModelAck, Presence, PresenceState, Status
from wire.topics import MessageKind

log = logging.getLogger(__name__)


class Accepted(NamedTuple):  # a tuple: made for every message, in half a frozen dataclass's time
    """A message that satisfied the contract, with the bytes it arrived as."""

    kind: MessageKind
    message: Message | StatusRecord  # a status the fast path vouched for is a StatusRecord
    payload: bytes


@dataclass
class Written:
    """What a committed batch did."""

    stored: Counter[MessageKind] = field(default_factory=Counter)
    duplicates: Counter[MessageKind] = field(default_factory=Counter)
    receipts: list[tuple[str, uuid.UUID]] = field(default_factory=list)  # (device_id, ack_of)
    refused: list[tuple[Accepted, ContractError]] = field(default_factory=list)

    def add(self, other: "Written") -> None:
        """Count `other`'s work in with this one's."""
        self.stored.update(other.stored)
        self.duplicates.update(other.duplicates)
        self.receipts.extend(other.receipts)
        self.refused.extend(other.refused)


class BatchWriter:
    """Writes batches of accepted messages through `sessions`."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def write(self, batch: Sequence[Accepted]) -> Written:
        """Store `batch` in one transaction. An error that one message causes (a constraint the checks
        did not foresee, or a bug) does not hold back the others: the batch is then written message by
        message, and the message that still fails is refused. The database being unreachable
        (`OperationalError`) propagates: nothing was committed, and the caller retries."""
        try:
            return self._write(batch)
        except OperationalError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                error = ContractError(
                    f"the registry could not store it ({type(exc).__name__})", Rejection.refused
                )
                return Written(refused=[(batch[0], error)])
            log.exception("a batch of %d failed; writing its messages one by one", len(batch))
            written = Written()
            for accepted in batch:
                written.add(self.write([accepted]))
            return written

    def _write(self, batch: Sequence[Accepted]) -> Written:
        written = Written()
        now = utcnow()
        with self.sessions() as session, session.begin():
            devices = known_devices(session, {a.message.device_id for a in batch})
            admitted: list[Accepted] = []
            for accepted in batch:
                state = devices.get(accepted.message.device_id)
                if state is None or state.status is not DeviceStatus.active:
                    why = "is not provisioned" if state is None else "is revoked"
                    error = ContractError(f"device {accepted.message.device_id} {why}", Rejection.refused)
                    written.refused.append((accepted, error))
                else:
                    admitted.append(accepted)
            self._statuses(session, [a for a in admitted if a.kind is MessageKind.STATUS], devices, written)
            self._knowledge(session, [a for a in admitted if a.kind is MessageKind.KNOWLEDGE], now, written)
            self._acks(session, [a for a in admitted if a.kind is MessageKind.MODEL_ACK], now, written)
            results = [a for a in admitted if a.kind is MessageKind.CMD_RESULT]
            self._command_results(session, results, now, written)
            presences = [
                PresenceUpdate(p.device_id, p.state is PresenceState.online, p.conn, p.sent_at)
                for p in (a.message for a in admitted)
                if isinstance(p, Presence)
            ]
            apply_presences(session, presences)
            written.stored[MessageKind.PRESENCE] += len(presences)
            refused = {id(a) for a, _ in written.refused}
            mark_seen(session, {a.message.device_id for a in admitted if id(a) not in refused}, now)
        return written

    @staticmethod
    def _statuses(
        session: Session,
        batch: list[Accepted],
        devices: dict[str, KnownDevice],
        written: Written,
    ) -> None:
        statuses = [a.message for a in batch if isinstance(a.message, Status | StatusRecord)]
        new = telemetry.add_statuses(session, statuses)
        written.stored[MessageKind.STATUS] += len(new)
        written.duplicates[MessageKind.STATUS] += len(statuses) - len(new)
        latest: dict[str, str] = {}
        trust: dict[str, int] = {}
        for status in sorted(statuses, key=lambda s: s.sent_at):
            # A redelivered status was heard before: its model may since have been replaced.
            if status.msg_id not in new:
                continue
            if status.model_id is not None:
                latest[status.device_id] = status.model_id
            if status.trust_version is not None:
                trust[status.device_id] = status.trust_version
        report_trust(session, {d: v for d, v in trust.items() if devices[d].trust_version != v})
        changed = {d: m for d, m in latest.items() if devices[d].reported_model_id != m}
        known = existing_models(session, set(changed.values()))  # one query; an unknown model is skipped
        for device_id, model_id in changed.items():
            if model_id in known:
                report_model(session, device_id, model_id)

    @staticmethod
    def _knowledge(session: Session, batch: list[Accepted], now: datetime, written: Written) -> None:
        for accepted in batch:
            report = accepted.message
            if not isinstance(report, KnowledgeReport):
                continue
            try:
                stored = knowledge.store_report(session, accepted.payload, received_at=now)
            except (CloudError, ContractError) as exc:
                written.refused.append((accepted, ContractError(str(exc), Rejection.refused)))
                continue
            if stored is None:
                written.duplicates[MessageKind.KNOWLEDGE] += 1
            else:
                written.stored[MessageKind.KNOWLEDGE] += 1
            written.receipts.append((report.device_id, report.msg_id))

    @staticmethod
    def _acks(session: Session, batch: list[Accepted], now: datetime, written: Written) -> None:
        messages = [a.message for a in batch if isinstance(a.message, ModelAck)]
        new = acks.record_acks(session, messages, received_at=now)
        written.stored[MessageKind.MODEL_ACK] += len(new)
        written.duplicates[MessageKind.MODEL_ACK] += len(messages) - len(new)
        written.receipts.extend((ack.device_id, ack.msg_id) for ack in messages)

    @staticmethod
    def _command_results(session: Session, batch: list[Accepted], now: datetime, written: Written) -> None:
        for accepted in batch:
            result = accepted.message
            if not isinstance(result, CommandResult):
                continue
            try:
                recorded = commands.record_result(session, result, received_at=now)
            except CloudError as exc:  # not this device's command, or not the command it names
                written.refused.append((accepted, ContractError(str(exc), Rejection.refused)))
                continue
            # No receipt: a device does not spool its answers; the cloud sends an unanswered command
            # again and gets the same answer (cloud/worker/tasks.py: deliver_commands).
            if recorded is commands.Recorded.stored:
                written.stored[MessageKind.CMD_RESULT] += 1
            else:
                written.duplicates[MessageKind.CMD_RESULT] += 1
