"""The daemon against a real mosquitto: presence, status, private feedback, RD on command, the spool
and receipts, and the proof that nothing it publishes carries a private sample."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_firmware_py.config import load_config
from device_firmware_py.daemon import Daemon
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.device.daemons import install_model, wait_until, write_config, write_stream
from wire.messages import Command, CommandName, Receipt, encode
from wire.topics import MessageKind, device_topic

TRUST = {"0123456789abcdef": base64.b64encode(bytes(32)).decode()}  # no update in these tests


@dataclass
class Running:
    """A daemon on a thread, and a cloud-side probe that records everything it publishes."""

    daemon: Daemon
    thread: threading.Thread
    probe: Probe
    device_id: str
    private_inputs: np.ndarray

    def published(self, kind: MessageKind) -> list[bytes]:
        return [m.payload for m in self.captured if m.topic == device_topic(self.device_id, kind)]

    @property
    def captured(self) -> list[Any]:
        while not self.probe.messages.empty():
            self._seen.append(self.probe.messages.get())
        return self._seen

    def __post_init__(self) -> None:
        self._seen: list[Any] = []


@pytest.fixture
def running(
    request: pytest.FixtureRequest, tmp_path: Path, mosquitto: RunningBroker, base_line: Any, small_data: Any
) -> Iterator[Running]:
    """A daemon whose simulated user labels each of the stream's samples once: 60, or as the test says
    with `pytest.mark.parametrize("running", [(samples, rd_settings, tls[, held_out])], indirect=True)`;
    with `held_out`, the user keeps the second half for testing, labelled as the model predicts, and
    labels the first half as the model never predicts."""
    samples, rd, tls, *rest = getattr(request, "param", (60, None, False))
    device_id = new_device_id("cam")
    secret = provisioned_device(mosquitto, device_id)
    user = small_data.users[0]
    inputs, labels = user.device_train[0].x[:samples], user.device_train[0].y[:samples]
    stream = write_stream(tmp_path / "stream.npz", inputs, labels)
    if rest and rest[0]:
        half = samples // 2
        predicted = base_line.artifact.load().predict(inputs)
        labels = np.concatenate([(predicted[:half] + 1) % small_data.num_classes, predicted[half:]])
        held_out = np.arange(samples) >= half
        np.savez(stream, inputs=inputs, labels=labels, held_out=held_out)
    config = load_config(
        write_config(tmp_path, mosquitto.target, device_id, secret, stream, trust=TRUST, rd=rd)
    )
    install_model(tmp_path, base_line.artifact.model, base_line.artifact.manifest)
    probe = Probe(mosquitto.cloud, f"cloud-{device_id}")
    assert probe.connect() is not None
    probe.subscribe(f"diredi/v1/dev/{device_id}/#")
    daemon = Daemon(config)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    yield Running(daemon, thread, probe, device_id, inputs)
    daemon.stop()
    thread.join(10)
    probe.close()


@pytest.mark.parametrize(
    "running", [(60, None, False), (60, None, True)], ids=["mqtt", "mqtts"], indirect=True
)
def test_the_daemon_reports_presence_and_status_of_its_model(running: Running, base_line: Any) -> None:
    # Execute
    statuses = wait_until(lambda: running.published(MessageKind.STATUS)[1:], 20, "two statuses")

    # Assert
    presence = json.loads(running.published(MessageKind.PRESENCE)[0])
    assert presence["state"] == "online"
    status = json.loads(statuses[-1])
    assert status["model_id"] == base_line.model_id
    assert status["inference_count"] > 0 and status["latency_p50_ms"] > 0
    assert 0 <= status["accuracy"] <= 1 and status["labelled_count"] > 0
    assert sum(status["class_histogram"].values()) > 0


@pytest.mark.parametrize("running", [(60, None, False, True)], ids=["held-out"], indirect=True)
def test_accuracy_is_measured_on_held_out_samples_and_only_the_others_become_feedback(
    running: Running,
) -> None:
    # Execute: the stream has gone round at least twice
    wait_until(lambda: running.daemon.inference_count >= 130, 30, "two passes of the stream")

    def measured() -> list[float]:
        statuses = [json.loads(p) for p in running.published(MessageKind.STATUS)]
        return [s["accuracy"] for s in statuses if s["accuracy"] is not None]

    # Assert: a measured feedback sample would have been a miss
    assert set(wait_until(measured, 20, "a status that measured accuracy")) == {1.0}
    assert running.daemon.feedback is not None and running.daemon.feedback.count() == 30


def test_rd_on_command_is_published_until_its_receipt_and_carries_no_private_sample(
    running: Running, mosquitto: RunningBroker
) -> None:
    # Prepare: the simulated user has labelled samples
    wait_until(lambda: running.daemon.feedback and running.daemon.feedback.count() >= 30, 20, "feedback")

    # Execute: the cloud asks for RD; the report is sent again until the receipt comes
    command = Command(device_id=running.device_id, command=CommandName.run_rd)
    running.probe.publish(device_topic(running.device_id, MessageKind.CMD), encode(command))
    reports = wait_until(lambda: running.published(MessageKind.KNOWLEDGE)[1:], 20, "a report sent twice")
    report = json.loads(reports[0])
    receipt = Receipt(device_id=running.device_id, ack_of=report["msg_id"])
    running.probe.publish(device_topic(running.device_id, MessageKind.RECEIPT), encode(receipt))
    wait_until(lambda: running.daemon.spool.pending() == 0, 10, "the spool to empty")

    # Assert: the same report each time, and nothing published holds a private input or its features
    assert {json.loads(r)["msg_id"] for r in reports} == {report["msg_id"]}
    assert report["sample_count"] >= 20
    model = running.daemon.model
    assert model is not None
    features, _ = model.run(running.private_inputs)
    assert_no_private_data([m.payload for m in running.captured], running.private_inputs, features)


@pytest.mark.parametrize("running", [(12, None, False)], indirect=True)
def test_rd_refuses_to_report_below_min_samples(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: the user labelled 12 samples; RD needs 20
    wait_until(lambda: running.daemon.feedback and running.daemon.feedback.count() == 12, 20, "feedback")

    # Execute
    command = Command(device_id=running.device_id, command=CommandName.run_rd)
    with caplog.at_level(logging.INFO, logger="device_firmware_py.daemon"):
        running.probe.publish(device_topic(running.device_id, MessageKind.CMD), encode(command))
        wait_until(lambda: "RD not run" in caplog.text, 20, "RD to be refused")
    wait_until(lambda: len(running.published(MessageKind.STATUS)) >= 2, 20, "statuses")

    # Assert: nothing reported, nothing spooled
    assert "12 labelled samples, RD needs at least 20" in caplog.text
    assert running.published(MessageKind.KNOWLEDGE) == [] and running.daemon.spool.pending() == 0


@pytest.mark.parametrize("running", [(40, {"epsilon": 2.0, "budget_epsilon": 2.5}, False)], indirect=True)
def test_rd_with_local_dp_states_its_epsilon_and_stops_at_the_budget(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    wait_until(lambda: running.daemon.feedback and running.daemon.feedback.count() >= 30, 20, "feedback")
    command = Command(device_id=running.device_id, command=CommandName.run_rd)
    topic = device_topic(running.device_id, MessageKind.CMD)

    # Execute: two requests; two reports compose (zCDP) to ε 2.875, more than the budget
    with caplog.at_level(logging.INFO, logger="device_firmware_py.daemon"):
        running.probe.publish(topic, encode(command))
        first = wait_until(lambda: running.published(MessageKind.KNOWLEDGE), 20, "a report")
        running.probe.publish(topic, encode(Command(device_id=running.device_id, command=CommandName.run_rd)))
        wait_until(lambda: "RD not reported" in caplog.text, 20, "the budget to stop RD")

    # Assert: the one report states its privacy; no second report was made
    privacy = json.loads(first[0])["privacy"]
    assert privacy["epsilon"] == 2.0 and privacy["spent_epsilon"] == pytest.approx(2.0)
    assert "bring ε to 2.875, above the budget of 2.500" in caplog.text
    assert {json.loads(r)["msg_id"] for r in running.published(MessageKind.KNOWLEDGE)} == {
        json.loads(first[0])["msg_id"]
    }


@pytest.mark.parametrize("running", [(30, {"schedule_s": 2}, False)], indirect=True)
def test_rd_runs_on_its_schedule(running: Running) -> None:
    # Execute: no command; the schedule says every 2 s
    reports = wait_until(lambda: running.published(MessageKind.KNOWLEDGE), 30, "a scheduled report")

    # Assert
    assert json.loads(reports[0])["sample_count"] >= 20


GARBAGE = [
    (MessageKind.CMD, b"not json"),
    (MessageKind.CMD, b'{"schema": "diredi.cmd/1", "command": "format_disk"}'),
    (MessageKind.CMD, b"[" * 5000),
    (MessageKind.CMD, b"{" + b'"x": 1,' * 3000 + b'"y": 2}'),
    (MessageKind.RECEIPT, b'{"schema": "diredi.receipt/1", "ack_of": "nope"}'),
    (MessageKind.RECEIPT, b"\xff\xfe"),
    (MessageKind.MODEL_DESIRED, b"not a document"),
    (MessageKind.MODEL_DESIRED, b'{"schema": "diredi.desired/1", "device_id": 7}'),
]


def test_garbage_from_the_cloud_never_stops_the_daemon(running: Running) -> None:
    # Prepare
    before = len(running.published(MessageKind.STATUS))

    # Execute: garbage on every topic the device listens to
    for kind, payload in GARBAGE:
        running.probe.publish(device_topic(running.device_id, kind), payload)

    # Assert: it keeps serving and reporting; each unreadable desired document gets a `failed` ack
    wait_until(
        lambda: len(running.published(MessageKind.STATUS)) >= before + 3, 30, "statuses after the garbage"
    )
    acks = wait_until(lambda: running.published(MessageKind.MODEL_ACK)[1:], 30, "two acks")
    assert running.thread.is_alive()
    results = [json.loads(a) for a in acks]
    assert {a["result"] for a in results} == {"failed"} and all(a["reason"] for a in results)
    assert all(a["running_model_id"] == running.daemon.model.manifest.model_id for a in results)  # type: ignore[union-attr]


def assert_no_private_data(payloads: list[bytes], inputs: np.ndarray, features: np.ndarray) -> None:
    """No payload holds any private input or feature vector: not as raw bytes (float32 or float16),
    not base64-encoded, and not as any row of any array the payload encodes."""
    private = list(inputs.reshape(len(inputs), -1)) + list(features)
    needles = []
    for row in private:
        for dtype in (np.float32, np.float16):
            raw = np.asarray(row, dtype=dtype).tobytes()
            needles += [raw[:32], base64.b64encode(raw)[:32]]
    for payload in payloads:
        for needle in needles:
            assert needle not in payload
        for array in encoded_arrays(json.loads(payload)):
            rows = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array[None]
            for row in private:
                for candidate in rows:
                    if candidate.shape == row.shape:
                        assert not np.allclose(candidate, row, atol=1e-3)


def encoded_arrays(document: Any) -> Iterator[np.ndarray]:
    """Every EncodedArray ({dtype, shape, data}) in a JSON document, decoded."""
    if isinstance(document, dict):
        if {"dtype", "shape", "data"} <= set(document):
            raw = base64.b64decode(document["data"])
            yield np.frombuffer(raw, dtype=document["dtype"]).reshape(document["shape"]).astype(np.float64)
            return
        for value in document.values():
            yield from encoded_arrays(value)
    elif isinstance(document, list):
        for value in document:
            yield from encoded_arrays(value)
