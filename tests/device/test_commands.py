"""The device's answers to commands: each command msg_id run once and answered the same way again, across
restarts; expired ones refused; and the daemon against a real mosquitto running report_now and run_rd."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_firmware_py import commands as device_commands
from device_firmware_py.commands import Answer, CommandAnswers
from device_firmware_py.config import load_config
from device_firmware_py.daemon import Daemon
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.device.daemons import install_model, wait_until, write_config, write_stream
from wire.messages import Command, CommandName, CommandOutcome, CommandResult, decode, encode
from wire.topics import MessageKind, device_topic

DEVICE = "cam-1"
NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
TRUST = {"0123456789abcdef": base64.b64encode(bytes(32)).decode()}  # no update in these tests


@dataclass
class Outbox:
    """What the answers published, as the link would have; `up` False plays a dropped connection."""

    sent: list[bytes] = field(default_factory=list)
    up: bool = True

    def send(self, payload: bytes) -> bool:
        if self.up:
            self.sent.append(payload)
        return self.up

    def results(self) -> list[CommandResult]:
        return [CommandResult.model_validate_json(p) for p in self.sent]


@dataclass
class Actions:
    """The daemon's side of the commands, counting its runs."""

    runs: list[CommandName] = field(default_factory=list)
    answer: Answer = Answer(CommandOutcome.done, "status published")

    def report_now(self) -> Answer:
        self.runs.append(CommandName.report_now)
        return self.answer

    def run_rd(self) -> Answer:
        self.runs.append(CommandName.run_rd)
        raise OSError("feedback store unreadable")


def answers(path: Path, actions: Actions, outbox: Outbox) -> CommandAnswers:
    table = {CommandName.report_now: actions.report_now, CommandName.run_rd: actions.run_rd}
    return CommandAnswers(DEVICE, path, table, outbox.send, clock=lambda: NOW)


def command(name: CommandName = CommandName.report_now, **fields: Any) -> Command:
    return Command(device_id=DEVICE, command=name, **fields)


def test_a_command_is_run_once_and_a_redelivery_gets_the_same_answer(tmp_path: Path) -> None:
    # Prepare
    actions, outbox = Actions(), Outbox()
    handler = answers(tmp_path / "answers.json", actions, outbox)
    sent = command(expires_at=NOW + timedelta(minutes=5))

    # Execute
    first = handler.handle(sent)
    again = handler.handle(Command.model_validate_json(encode(sent)))

    # Assert
    assert actions.runs == [CommandName.report_now]
    assert (first.ack_of, first.command, first.outcome, first.detail) == (
        sent.msg_id,
        CommandName.report_now,
        CommandOutcome.done,
        "status published",
    )
    assert again == first and outbox.sent[0] == outbox.sent[1] == encode(first)
    kind, decoded = decode(device_topic(DEVICE, MessageKind.CMD_RESULT), outbox.sent[0])
    assert kind is MessageKind.CMD_RESULT and decoded == first


def test_the_answers_outlive_a_restart(tmp_path: Path) -> None:
    # Prepare
    actions, outbox = Actions(), Outbox()
    sent = command()
    first = answers(tmp_path / "answers.json", actions, outbox).handle(sent)

    # Execute: a new daemon process on the same state
    again = answers(tmp_path / "answers.json", actions, outbox).handle(sent)

    # Assert
    assert again == first and actions.runs == [CommandName.report_now]


def test_an_answer_not_sent_while_offline_goes_out_when_the_command_comes_again(tmp_path: Path) -> None:
    # Prepare
    actions, outbox = Actions(), Outbox(up=False)
    handler = answers(tmp_path / "answers.json", actions, outbox)
    sent = command()
    first = handler.handle(sent)
    outbox.up = True

    # Execute: the cloud got no answer and sends the same command again
    handler.handle(sent)

    # Assert
    assert outbox.results() == [first] and actions.runs == [CommandName.report_now]


@pytest.mark.parametrize("late", [timedelta(0), timedelta(seconds=1), timedelta(days=400)])
def test_an_expired_command_is_answered_expired_and_not_run(tmp_path: Path, late: timedelta) -> None:
    # Prepare
    actions, outbox = Actions(), Outbox()

    # Execute
    result = answers(tmp_path / "a.json", actions, outbox).handle(command(expires_at=NOW - late))

    # Assert
    assert result.outcome is CommandOutcome.expired and "after it expired" in result.detail
    assert actions.runs == []


def test_a_failing_action_is_answered_failed_with_the_error_and_no_traceback(tmp_path: Path) -> None:
    # Prepare
    actions, outbox = Actions(), Outbox()

    # Execute
    result = answers(tmp_path / "a.json", actions, outbox).handle(command(CommandName.run_rd))

    # Assert
    assert (result.outcome, result.detail) == (CommandOutcome.failed, "OSError: feedback store unreadable")
    assert "Traceback" not in outbox.sent[0].decode()


def test_a_command_the_device_has_no_action_for_is_refused(tmp_path: Path) -> None:
    # Prepare
    outbox = Outbox()
    handler = CommandAnswers(DEVICE, tmp_path / "a.json", {}, outbox.send, clock=lambda: NOW)

    # Execute
    result = handler.handle(command(CommandName.run_rd))

    # Assert
    assert result.outcome is CommandOutcome.refused and "does not run run_rd" in result.detail


def test_an_answer_is_cleaned_to_fit_the_contract(tmp_path: Path) -> None:
    # Prepare: a NUL and a long detail, and values too large for a result's payload
    values: dict[str, Any] = {f"v{i}": "\x01" * 256 for i in range(16)}  # 6 bytes each in JSON
    actions = Actions(answer=Answer(CommandOutcome.done, "a\x00b" + "c" * 5000, values))
    outbox = Outbox()

    # Execute
    answers(tmp_path / "a.json", actions, outbox).handle(command())

    # Assert: what went out passes the contract
    _, result = decode(device_topic(DEVICE, MessageKind.CMD_RESULT), outbox.sent[0])
    assert isinstance(result, CommandResult)
    assert result.detail.startswith("abc") and len(result.detail) == device_commands.MAX_DETAIL
    assert result.values == {}


def test_values_the_contract_refuses_are_left_out_and_the_answer_still_goes(tmp_path: Path) -> None:
    # Prepare
    actions = Actions(answer=Answer(CommandOutcome.done, "ok", {"Bad Key": 1}))
    outbox = Outbox()

    # Execute
    result = answers(tmp_path / "a.json", actions, outbox).handle(command())

    # Assert
    assert (result.outcome, result.values) == (CommandOutcome.done, {})
    assert outbox.results() == [result]


def test_answers_are_bounded_and_the_oldest_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(device_commands, "KEEP_ANSWERS", 3)
    actions, outbox = Actions(), Outbox()
    handler = answers(tmp_path / "a.json", actions, outbox)
    sent = [command() for _ in range(4)]
    for c in sent:
        handler.handle(c)

    # Execute
    kept = json.loads((tmp_path / "a.json").read_text())

    # Assert
    assert [k for k, _ in kept] == [str(c.msg_id) for c in sent[1:]]


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"{}",
        b'[["a"]]',
        b'[["a", 1]]',
        b"[" * 5000,
        b'[["k", "{\\"schema\\": \\"diredi.cmd_result/1\\"}"]]',
    ],
)
def test_an_unreadable_answers_file_starts_afresh(tmp_path: Path, content: bytes) -> None:
    # Prepare
    (tmp_path / "a.json").write_bytes(content)
    actions, outbox = Actions(), Outbox()

    # Execute
    result = answers(tmp_path / "a.json", actions, outbox).handle(command())

    # Assert
    assert result.outcome is CommandOutcome.done and actions.runs == [CommandName.report_now]


# The daemon against a real mosquitto --------------------------------------------------------------


@dataclass
class Device:
    """A running daemon and the cloud's probe on every one of its topics."""

    daemon: Daemon
    probe: Probe
    device_id: str
    seen: list[Any] = field(default_factory=list)

    def published(self, kind: MessageKind) -> list[bytes]:
        while not self.probe.messages.empty():
            self.seen.append(self.probe.messages.get())
        return [m.payload for m in self.seen if m.topic == device_topic(self.device_id, kind)]

    def send(self, sent: Command) -> None:
        self.probe.publish(device_topic(self.device_id, MessageKind.CMD), encode(sent))

    def results(self, count: int) -> list[CommandResult]:
        payloads = wait_until(
            lambda: (p := self.published(MessageKind.CMD_RESULT))[count - 1 :] and p, 20, f"{count} results"
        )
        return [CommandResult.model_validate_json(p) for p in payloads]


@pytest.fixture
def device(
    request: pytest.FixtureRequest, tmp_path: Path, mosquitto: RunningBroker, base_line: Any, small_data: Any
) -> Iterator[Device]:
    """A daemon whose simulated user labels `samples` of its stream (40, or the test's parameter: 0 runs
    it without a model)."""
    samples = getattr(request, "param", 40)
    device_id = new_device_id("cmd")
    secret = provisioned_device(mosquitto, device_id)
    pool = small_data.users[0].device_train[0]
    stream = write_stream(tmp_path / "stream.npz", pool.x[: max(samples, 4)], pool.y[: max(samples, 4)])
    config = load_config(write_config(tmp_path, mosquitto.target, device_id, secret, stream, trust=TRUST))
    if samples:
        install_model(tmp_path, base_line.artifact.model, base_line.artifact.manifest)
    probe = Probe(mosquitto.cloud, f"cloud-{device_id}")
    assert probe.connect() is not None
    probe.subscribe(f"diredi/v1/dev/{device_id}/#")
    daemon = Daemon(config)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    wait_until(lambda: daemon.link.connected, 20, "the daemon to connect")
    try:
        yield Device(daemon, probe, device_id)
    finally:
        daemon.stop()
        thread.join(10)
        probe.close()


def test_run_rd_answers_done_with_the_report_it_spooled_and_a_redelivery_runs_nothing_again(
    device: Device,
) -> None:
    # Prepare: the simulated user has labelled enough samples
    wait_until(lambda: device.daemon.feedback and device.daemon.feedback.count() >= 30, 20, "feedback")
    sent = Command(device_id=device.device_id, command=CommandName.run_rd)

    # Execute
    device.send(sent)
    (first,) = device.results(1)
    device.send(sent)  # the same msg_id again, as the cloud resends an unanswered command
    results = device.results(2)

    # Assert
    assert (first.ack_of, first.outcome) == (sent.msg_id, CommandOutcome.done), first
    reports = {json.loads(r)["msg_id"] for r in device.published(MessageKind.KNOWLEDGE)}
    assert reports == {first.values["knowledge_msg_id"]}
    assert first.values["samples"] >= 30  # type: ignore[operator]
    assert results[1] == first


def test_report_now_publishes_a_status_and_answers_done(device: Device) -> None:
    # Prepare
    wait_until(lambda: device.published(MessageKind.STATUS), 20, "a first status")
    before = len(device.published(MessageKind.STATUS))

    # Execute
    device.send(Command(device_id=device.device_id, command=CommandName.report_now))
    (result,) = device.results(1)

    # Assert
    assert (result.outcome, result.detail) == (CommandOutcome.done, "status published")
    assert len(device.published(MessageKind.STATUS)) > before


def test_an_expired_run_rd_is_answered_expired_and_reports_nothing(device: Device) -> None:
    # Prepare
    wait_until(lambda: device.daemon.feedback and device.daemon.feedback.count() >= 30, 20, "feedback")
    stale = datetime.now(UTC) - timedelta(seconds=1)

    # Execute
    device.send(Command(device_id=device.device_id, command=CommandName.run_rd, expires_at=stale))
    (result,) = device.results(1)

    # Assert
    assert result.outcome is CommandOutcome.expired
    assert device.published(MessageKind.KNOWLEDGE) == []


@pytest.mark.parametrize("device", [12], indirect=True)
def test_run_rd_below_min_samples_is_refused_with_the_reason(device: Device) -> None:
    # Prepare
    wait_until(lambda: device.daemon.feedback and device.daemon.feedback.count() == 12, 20, "feedback")

    # Execute
    device.send(Command(device_id=device.device_id, command=CommandName.run_rd))
    (result,) = device.results(1)

    # Assert
    assert result.outcome is CommandOutcome.refused
    assert "12 labelled samples, RD needs at least 20" in result.detail


@pytest.mark.parametrize("device", [0], indirect=True)
def test_run_rd_without_a_model_is_refused(device: Device) -> None:
    # Execute
    device.send(Command(device_id=device.device_id, command=CommandName.run_rd))
    (result,) = device.results(1)

    # Assert
    assert (result.outcome, result.detail) == (CommandOutcome.refused, "no model installed: RD needs one")


def test_a_command_for_another_device_or_garbage_gets_no_answer(device: Device) -> None:
    # Prepare: garbage on the device's command topic, then a valid command
    topic = device_topic(device.device_id, MessageKind.CMD)
    for payload in (b"not json", b'{"schema": "diredi.cmd/1", "command": "format_disk"}', b"[" * 5000):
        device.probe.publish(topic, payload)
    other = Command(device_id="cam-someone-else", command=CommandName.report_now)
    device.probe.publish(topic, encode(other))
    sent = Command(device_id=device.device_id, command=CommandName.report_now, msg_id=uuid.uuid4())

    # Execute
    device.send(sent)
    results = device.results(1)

    # Assert: only the valid command was answered
    assert [r.ack_of for r in results] == [sent.msg_id]
    assert device.daemon.link.connected
