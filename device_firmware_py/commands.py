"""The device's answers to the cloud's commands: each command run once, its answer kept and sent again."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from device_firmware_py.files import write_atomically
from wire.limits import max_payload_bytes
from wire.messages import Command, CommandName, CommandOutcome, CommandResult, encode
from wire.topics import MessageKind

log = logging.getLogger(__name__)

KEEP_ANSWERS = 256  # commands remembered (commands live a day at most; a fleet sends a few)
MAX_DETAIL = 512  # characters: an answer always fits its payload limit

Value = str | int | float | bool | None


class Answer(NamedTuple):
    """What running a command came to: the outcome, why, and a few values for the operator."""

    outcome: CommandOutcome
    detail: str
    values: Mapping[str, Value] = {}


Action = Callable[[], Answer]
# Publishes an answer on the device's cmd/result topic; False when it could not (not connected).
Send = Callable[[bytes], bool]


class CommandAnswers:
    """Runs the cloud's commands through `actions` and sends each answer through `send`.

    Each command msg_id is run once: a redelivered command (QoS 1, or the cloud's resend of one it got
    no answer to) gets the answer it got the first time, with the same msg_id, not a second run. The
    answers are kept in `path`, so this holds across restarts, for the last `KEEP_ANSWERS` commands.
    Answers are not spooled: a lost one comes back when the cloud sends the unanswered command again.
    """

    def __init__(
        self,
        device_id: str,
        path: Path,
        actions: Mapping[CommandName, Action],
        send: Send,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.device_id = device_id
        self.path = path
        self.actions = actions
        self.send = send
        self.clock = clock
        self._answers: OrderedDict[str, str] = self._load()  # command msg_id → result payload

    def handle(self, command: Command) -> CommandResult:
        """Answer `command` (run it if it was never run), send the answer and return it."""
        key = str(command.msg_id)
        kept = self._answers.get(key)
        if kept is not None:
            result = CommandResult.model_validate_json(kept)
            log.info("command %s (%s) again: answered %s before", command.command, key, result.outcome)
            self._send(result, kept.encode())
            return result
        answer = self._run(command)
        fields = {
            "device_id": self.device_id,
            "ack_of": command.msg_id,
            "command": command.command,
            "outcome": answer.outcome,
            "detail": _clean(answer.detail),
        }
        try:
            result = CommandResult.model_validate({**fields, "values": dict(answer.values)})
            payload = encode(result)
        except ValueError:  # values the contract refuses (pydantic's ValidationError is one)
            log.warning("command %s: values the contract refuses left out of the answer", key)
            payload = b""
        if not payload or len(payload) > max_payload_bytes(MessageKind.CMD_RESULT):
            result = CommandResult.model_validate(fields)
            payload = encode(result)
        # Kept before it is sent: a crash in between sends the kept answer on redelivery, never a rerun.
        self._keep(key, payload.decode())
        log.info("command %s (%s): %s %s", command.command, key, result.outcome, result.detail)
        self._send(result, payload)
        return result

    def _send(self, result: CommandResult, payload: bytes) -> None:
        if not self.send(payload):
            log.warning(
                "answer %s to command %s not sent (offline): kept for its resend",
                result.msg_id,
                result.ack_of,
            )

    def _run(self, command: Command) -> Answer:
        now = self.clock()
        if command.expires_at is not None and command.expires_at <= now:
            return Answer(
                CommandOutcome.expired,
                f"arrived at {now.isoformat(timespec='seconds')}, after it expired at "
                f"{command.expires_at.isoformat(timespec='seconds')}",
            )
        action = self.actions.get(command.command)
        if action is None:
            return Answer(CommandOutcome.refused, f"this device does not run {command.command}")
        try:
            return action()
        except Exception as exc:  # the answer names the error, never a traceback (STYLE 9)
            log.exception("command %s failed", command.command)
            return Answer(CommandOutcome.failed, f"{type(exc).__name__}: {exc}")

    def _keep(self, key: str, payload: str) -> None:
        self._answers[key] = payload
        while len(self._answers) > KEEP_ANSWERS:
            self._answers.popitem(last=False)
        try:
            write_atomically(self.path, json.dumps(list(self._answers.items())).encode())
        except OSError as exc:  # the answer still goes out; only a restart would forget it
            log.error("could not keep the answers to commands in %s: %s", self.path, exc)

    def _load(self) -> OrderedDict[str, str]:
        try:
            pairs = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return OrderedDict()
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            log.warning("answers to commands in %s unreadable (%s): starting afresh", self.path, exc)
            return OrderedDict()
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
        ):
            log.warning("answers to commands in %s are not a list of pairs: starting afresh", self.path)
            return OrderedDict()
        kept: OrderedDict[str, str] = OrderedDict()
        for key, payload in pairs[-KEEP_ANSWERS:]:
            try:
                CommandResult.model_validate_json(payload)
            except ValueError:  # pydantic's ValidationError is one
                log.warning("an answer kept in %s is not a command result: dropped", self.path)
                continue
            kept[key] = payload
        return kept


def _clean(detail: str) -> str:
    # The contract refuses NUL (PostgreSQL text cannot hold it) and bounds the detail.
    return detail.replace("\0", "")[:MAX_DETAIL]
