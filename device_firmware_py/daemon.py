"""`diredi-device run`: the on-device daemon (DESIGN §5).

One main thread does the work, in a loop paced by the input rate: infer on the next input, act on
what the cloud sent (a desired model, a receipt, a command), publish status, run RD when the policy
says so, and hand spooled knowledge reports and acks to the link until their receipts arrive. The
MQTT link and the feedback socket run on threads of their own and only queue what they receive.

The user's private samples stay in the feedback store: they reach RD, and RD's aggregates (the
knowledge report) are the only thing derived from them that is ever published.

A little over the house's 450 lines: it is the loop that ties the parts together, each of which (the
link, the stores, RD, the updater, the commands' answers) lives in a module of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

from device_firmware_py.commands import Answer, CommandAnswers, Value
from device_firmware_py.config import DeviceConfig, prepare_state_dir, read_identity
from device_firmware_py.download import http_fetcher
from device_firmware_py.exceptions import (
    ClockNotSetError,
    DeviceError,
    DownloadCancelled,
    FeedbackFullError,
    NotEnoughSamplesError,
    PrivacyBudgetExhaustedError,
    SpoolError,
)
from device_firmware_py.feedback import FeedbackServer, FeedbackStore, check_socket_path
from device_firmware_py.images import ImageInput
from device_firmware_py.link import DeviceLink, Inbound
from device_firmware_py.ota import ModelSlots, UpdateOutcome, Updater
from device_firmware_py.privacy import DPConfig, PrivacyAccountant
from device_firmware_py.rd import RDPolicy, extract_knowledge
from device_firmware_py.runtime import MAX_ARTIFACT_BYTES, Int8Model
from device_firmware_py.sources import (
    DirectorySource,
    InputSource,
    Sample,
    SimulatedSource,
    load_position,
    save_position,
)
from device_firmware_py.spool import Spool
from device_firmware_py.systemd import Notifier, stop_on_signals
from device_firmware_py.telemetry import Window, cpu_seconds
from device_firmware_py.trust import TrustStore
from wire.desired import DesiredModel
from wire.errors import ContractError
from wire.messages import Command, CommandName, CommandOutcome, ModelAck, Receipt, decode, encode
from wire.topics import TRUST_TOPIC, MessageKind, device_topic

log = logging.getLogger(__name__)

STATE_FILES = {
    "spool": "spool.sqlite3",
    "models": "models",
    "feedback": "feedback",
    "privacy": "privacy.json",
    "desired": "desired-state.json",
    "trust": "trust.json",
    "socket": "feedback.sock",
    "stream": "stream-position.json",
    "commands": "command-answers.json",
}


class Daemon:
    """The device: its model, its private feedback, and its conversation with the cloud."""

    def __init__(
        self,
        config: DeviceConfig,
        *,
        notifier: Notifier | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.state_dir = prepare_state_dir(config)
        self.identity = read_identity(config)
        self.notifier = notifier or Notifier()
        self.stopping = stopping or threading.Event()  # set by SIGTERM/SIGINT (`stop_on_signals`)
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        files = {name: self.state_dir / path for name, path in STATE_FILES.items()}
        self.socket_path = check_socket_path(files["socket"])  # before anything is opened
        self.spool = Spool(files["spool"], max_bytes=config.spool.max_mb * 1024 * 1024)
        self.slots = ModelSlots(files["models"])
        fetch = http_fetcher(
            config.api.url,
            device_id=self.device_id,
            identity=self.identity,
            max_bytes=MAX_ARTIFACT_BYTES,
            ca_file=config.api.ca_file or config.broker.ca_file,
            timeout=config.api.timeout_s,
            cancelled=self.stopping,
        )
        self.trust = TrustStore(
            config.trusted_keys(),
            files["trust"],
            root_version=config.trust_version,
            root_threshold=config.trust_threshold,
        )
        self.updater = Updater(self.device_id, self.trust, self.slots, fetch, files["desired"])
        # Documents to apply again: a trust chain or desired model that waits for the clock to be set,
        # and a desired model signed by a key that a later trust chain may bring.
        self._retry_trust: bytes | None = None
        self._desired_for_clock: bytes | None = None
        self._desired_for_trust: bytes | None = None
        self.model: Int8Model | None = self.updater.load_active()
        self.feedback_dir = files["feedback"]
        self.feedback: FeedbackStore | None = None
        self.feedback_server: FeedbackServer | None = None
        self.source: InputSource | None = None
        self.accountant: PrivacyAccountant | None = None
        if config.rd.epsilon is not None and config.rd.budget_epsilon is not None:
            self.accountant = PrivacyAccountant(config.rd.budget_epsilon, config.rd.delta, files["privacy"])
        self.link = DeviceLink(
            config.broker_target(self.identity),
            self.device_id,
            self.inbox,
            keepalive=config.broker.keepalive_s,
        )
        self.window = Window()
        self.inference_count = 0
        self.started = time.monotonic()
        self._connections_seen = 0
        self._rd_mark = 0  # the feedback id RD last ran up to
        self.commands = CommandAnswers(
            self.device_id,
            files["commands"],
            {CommandName.report_now: self._report_now, CommandName.run_rd: self._rd_now},
            lambda payload: self.link.publish(MessageKind.CMD_RESULT, payload),
        )
        self._last_rd = time.monotonic()
        self._last_status = 0.0
        self._cpu_at_status = (time.monotonic(), cpu_seconds())
        self.stream_state = files["stream"]
        self._stream_consumed = load_position(self.stream_state)
        if self.model is not None:
            self._open_model_inputs(self.model)

    # Running --------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; then drain (finish the step in hand, say offline, close)."""
        if threading.current_thread() is threading.main_thread():
            stop_on_signals(self.stopping)
        self.link.start()
        running = self.model.manifest.model_id if self.model else "no model yet"
        self.notifier.ready(f"serving {running}")
        log.info("device %s started, serving %s", self.device_id, running)
        period = 1.0 / self.config.input.rate_hz
        next_tick = time.monotonic()
        try:
            while not self.stopping.is_set():
                self.notifier.watchdog()
                self.step()
                next_tick += period
                delay = next_tick - time.monotonic()
                if delay < -1.0:  # fell behind (a download, an RD run): do not try to catch up
                    next_tick = time.monotonic()
                elif delay > 0:
                    self.stopping.wait(delay)
        finally:
            self.notifier.stopping()
            self.close()

    def step(self) -> None:
        """One turn of the loop: messages, one inference, status, RD, spool."""
        self._handle_inbox()
        self._infer_one()
        now = time.monotonic()
        if now - self._last_status >= self.config.status.interval_s:
            self._retry_for_clock()
            self._publish_status()
            self._save_stream_position()
            self._last_status = now
        if self._rd_due(now):
            self._run_rd()
        self._flush_spool()

    def stop(self) -> None:
        """Ask the loop to end after its current step."""
        self.stopping.set()

    def close(self) -> None:
        """Stop the threads and close the stores."""
        if self.feedback_server is not None:
            self.feedback_server.stop()
        self._save_stream_position()
        self.link.stop()
        self.spool.close()
        self.notifier.close()
        log.info("device %s stopped", self.device_id)

    # Inference ------------------------------------------------------------------------------------

    def _open_model_inputs(self, model: Int8Model) -> None:
        """Open the input source and the feedback store for the model's input shape and classes."""
        shape = tuple(model.manifest.input.shape[1:])
        classes = model.manifest.num_classes
        if self.feedback is None:
            self.feedback = FeedbackStore(self.feedback_dir, input_shape=shape, num_classes=classes)
            self._rd_mark = self.feedback.last_id()
            self.feedback_server = FeedbackServer(self.socket_path, self.feedback)
            self.feedback_server.start()
        if self.source is None:
            settings = self.config.input
            if settings.source == "simulated":
                self.source = SimulatedSource(settings.path, shape, classes, offset=self._stream_consumed)
            else:
                self.source = DirectorySource(settings.path, shape, ImageInput.of(model.manifest))

    def _infer_one(self) -> None:
        if self.model is None or self.source is None:
            return
        sample = self.source.next()
        if sample is None:
            return
        started = time.perf_counter()
        _, logits = self.model.run(sample.input)
        latency_ms = (time.perf_counter() - started) * 1000
        # the decision is the class of the top output; its confidence, that class's pooled belief
        predicted = int(self.model.decide(logits)[0])
        probabilities = self.model.class_probabilities(logits)[0]
        # Accuracy is measured on the samples the user holds out, when the stream marks them.
        measured = sample.label if sample.held_out is not False else None
        self.window.record(latency_ms, float(probabilities[predicted]), predicted, measured)
        self.inference_count += 1
        self._simulated_feedback(sample)

    def _simulated_feedback(self, sample: Sample) -> None:
        """The simulated user labels every n-th sample of their stream, once (on its first pass), as a
        real one would through `diredi-device feedback add` or the socket."""
        every = self.config.input.feedback_every
        number, self._stream_consumed = self._stream_consumed, self._stream_consumed + 1
        source = self.source
        first_pass = isinstance(source, SimulatedSource) and number < len(source.labels)
        if (
            every
            and first_pass
            and sample.label is not None
            and sample.held_out is not True
            and self.feedback is not None
            and number % every == 0
        ):
            try:
                self.feedback.add(sample.input, sample.label)
            except FeedbackFullError:
                log.warning("the feedback store is full; the simulated user's label is not kept")

    def _save_stream_position(self) -> None:
        if isinstance(self.source, SimulatedSource):
            save_position(self.stream_state, self._stream_consumed)

    # Status ---------------------------------------------------------------------------------------

    def _publish_status(self) -> None:
        window, self.window = self.window, Window()
        now, cpu = time.monotonic(), cpu_seconds()
        then, cpu_then = self._cpu_at_status
        self._cpu_at_status = (now, cpu)
        status = window.status(
            self.device_id,
            model_id=self.model.manifest.model_id if self.model else None,
            uptime_s=now - self.started,
            inference_count=self.inference_count,
            labelled_count=self.feedback.count() if self.feedback else None,
            cpu_percent=100 * (cpu - cpu_then) / (now - then) if now > then else None,
            trust_version=self.trust.version,
        )
        self.link.publish(MessageKind.STATUS, encode(status))

    # RD -------------------------------------------------------------------------------------------

    def _rd_due(self, now: float) -> bool:
        if self.model is None or self.feedback is None:
            return False
        rd = self.config.rd
        if rd.new_samples and self.feedback.labelled_since(self._rd_mark) >= rd.new_samples:
            return True
        return bool(rd.schedule_s) and now - self._last_rd >= rd.schedule_s

    def _run_rd(self) -> Answer:
        """Extract the knowledge of the labelled samples and spool the report; below `min_samples` or
        beyond the privacy budget nothing is reported. The answer says which (for a `run_rd` command)."""
        assert self.model is not None and self.feedback is not None  # noqa: S101 (checked by callers)
        self._last_rd = time.monotonic()
        mark = self.feedback.last_id()
        inputs, labels = self.feedback.samples()
        rd = self.config.rd
        dp = DPConfig(epsilon=rd.epsilon, delta=rd.delta) if rd.epsilon is not None else None
        try:
            report = extract_knowledge(
                self.model,
                inputs,
                labels,
                device_id=self.device_id,
                policy=RDPolicy(min_samples=rd.min_samples),
                dp=dp,
                accountant=self.accountant,
            )
        except NotEnoughSamplesError as exc:
            log.info("RD not run: %s", exc)
            return Answer(CommandOutcome.refused, str(exc))
        except PrivacyBudgetExhaustedError as exc:
            log.warning("RD not reported: %s", exc)
            self._rd_mark = mark
            return Answer(CommandOutcome.refused, str(exc))
        except DeviceError as exc:  # samples that no longer fit the model, an unreadable privacy ledger
            log.error("RD failed: %s", exc)
            self._rd_mark = mark  # not again until new samples come
            return Answer(CommandOutcome.failed, str(exc))
        self._rd_mark = mark
        payload = encode(report)
        if not self._spool(report.msg_id, MessageKind.KNOWLEDGE, payload):
            return Answer(CommandOutcome.failed, "the spool could not keep the knowledge report")
        log.info(
            "knowledge report %s from %d labelled samples (%d bytes) spooled",
            report.msg_id,
            len(labels),
            len(payload),
        )
        values: dict[str, Value] = {
            "knowledge_msg_id": str(report.msg_id),
            "samples": len(labels),
            "bytes": len(payload),
        }
        return Answer(CommandOutcome.done, f"knowledge report from {len(labels)} labelled samples", values)

    # Commands -------------------------------------------------------------------------------------

    def _report_now(self) -> Answer:
        self._publish_status()
        self._last_status = time.monotonic()
        return Answer(CommandOutcome.done, "status published")

    def _rd_now(self) -> Answer:
        if self.model is None or self.feedback is None:
            return Answer(CommandOutcome.refused, "no model installed: RD needs one")
        if self.feedback.count() == 0:
            return Answer(CommandOutcome.refused, "no private feedback: the user has labelled nothing")
        return self._run_rd()

    # Messages from the cloud ----------------------------------------------------------------------

    def _handle_inbox(self) -> None:
        while True:
            try:
                inbound = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._handle(inbound)
            except DownloadCancelled:
                log.info("download cancelled: stopping; the desired model is fetched again at start")
                return
            except Exception:  # a message must never stop the daemon
                log.exception("could not handle a message on %s", inbound.topic)

    def _handle(self, inbound: Inbound) -> None:
        if inbound.topic == TRUST_TOPIC:
            if inbound.payload:
                self._trust(inbound.payload)
            return
        try:
            kind, message = decode(inbound.topic, inbound.payload)
        except ContractError as exc:
            if not inbound.topic.endswith("/" + MessageKind.MODEL_DESIRED.value):
                log.warning("ignored a message on %s: %s", inbound.topic, exc)
                return
            kind, message = MessageKind.MODEL_DESIRED, None  # the updater says why, in a `failed` ack
        if kind is MessageKind.RECEIPT and isinstance(message, Receipt):
            if self.spool.receipt(message.ack_of):
                log.info("receipt for %s: delivered", message.ack_of)
        elif kind is MessageKind.CMD and isinstance(message, Command):
            self.commands.handle(message)
        elif kind is MessageKind.MODEL_DESIRED:
            if inbound.payload:  # an empty retained message clears the document: nothing to do
                self._desired(inbound.payload, message if isinstance(message, DesiredModel) else None)

    def _trust(self, payload: bytes) -> None:
        try:
            reached = self.trust.apply(payload)
        except ContractError as exc:
            # A chain that does not verify is ignored; one that waits for the clock is tried again.
            self._retry_trust = payload if isinstance(exc, ClockNotSetError) else None
            log.warning("trust chain not applied: %s", exc)
            return
        self._retry_trust = None
        if reached is not None:
            self._last_status = 0.0  # tell the cloud at once: it waits for the fleet to trust a new key
            if self._desired_for_trust is not None:
                self._desired(self._desired_for_trust, None)

    def _retry_for_clock(self) -> None:
        if self._retry_trust is not None:
            self._trust(self._retry_trust)
        if self._desired_for_clock is not None:
            self._desired(self._desired_for_clock, None)

    def _desired(self, payload: bytes, document: DesiredModel | None) -> None:
        named = document.manifest.model_id if document else "(unreadable document)"
        self.notifier.status(f"updating to {named}")
        outcome = self.updater.apply(payload)
        waits = outcome.retry and outcome.result is None
        self._desired_for_clock = payload if waits else None
        self._desired_for_trust = payload if outcome.retry and not waits else None
        self._after_update(outcome)

    def _after_update(self, outcome: UpdateOutcome) -> None:
        if outcome.result is None:
            return
        if outcome.result.value == "installed":
            self.model = self.updater.load_active()
            if self.model is not None:
                self._open_model_inputs(self.model)
        elif outcome.result.value == "rolled_back":
            self.model = self.updater.load_active()
        ack = ModelAck(
            device_id=self.device_id,
            model_id=outcome.model_id or "unknown",
            result=outcome.result,
            reason=outcome.reason[:1024].replace("\0", ""),
            running_model_id=self.model.manifest.model_id if self.model else None,
        )
        self._spool(ack.msg_id, MessageKind.MODEL_ACK, encode(ack))
        log.info("model %s: %s %s", ack.model_id, ack.result, ack.reason)
        self.notifier.status(f"serving {ack.running_model_id or 'no model'}")

    # The spool ------------------------------------------------------------------------------------

    def _spool(self, msg_id: uuid.UUID, kind: MessageKind, payload: bytes) -> bool:
        """Keep a message until its receipt; False (logged) when the spool cannot take it (full, or its
        disk failing): the message is then lost, never the ones already kept."""
        try:
            self.spool.add(msg_id, device_topic(self.device_id, kind), payload)
        except SpoolError as exc:
            log.error("could not spool a %s message: %s", kind, exc)
            return False
        return True

    def _flush_spool(self) -> None:
        """Send what is due: everything again after a reconnect, in order; then what waited
        `resend_after_s` for its receipt."""
        if not self.link.connected:
            return
        if self.link.connections != self._connections_seen:
            self._connections_seen = self.link.connections
            self.spool.reset()
        now = time.time()
        for entry in self.spool.due(now, self.config.spool.resend_after_s, limit=20):
            if not self.link.send(entry.topic, entry.payload):
                return
            self.spool.mark_sent(entry.msg_id, now)
