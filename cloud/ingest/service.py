"""The ingest service (`diredi ingest`): device messages from the broker into the registry, nothing lost.

- A persistent session at QoS 1 with manual acknowledgement: a message is acknowledged to the broker
  only after the batch that holds it was committed (or it was refused), so a crash before the commit
  makes the broker deliver it again, and its msg_id makes the second delivery a no-op.
- On mosquitto (MQTT 5) status, knowledge and acks come through shared subscriptions, so several
  ingests split the load; presence comes through a plain subscription to every ingest (it is state,
  and retained: a shared subscription would not deliver the retained presence of devices that
  connected while no ingest ran), applied by the `conn` rule, which gives the same result in any order.
  On the embedded broker (MQTT 3.1.1, no shared subscriptions) everything is a plain subscription.
- Messages are validated by the wire contract and written in batches (`DIREDI_INGEST_BATCH_SIZE`
  messages or `DIREDI_INGEST_BATCH_MS`, whichever comes first); after each commit the receipts of
  knowledge reports and acks are published, then the batch is acknowledged.
- Refused messages are counted per reason and logged once each with the reason (at most
  `LOG_BURST` a minute per reason, then a count of those not logged).
"""

import logging
import queue
import threading
import time
import uuid
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from broker.client import BrokerTarget
from cloud.ingest.writer import Accepted, BatchWriter, Written
from wire.errors import ContractError, Rejection
from wire.messages import Receipt, decode, encode
from wire.topics import MessageKind, device_filter, device_topic

log = logging.getLogger(__name__)

SHARED_KINDS = (MessageKind.STATUS, MessageKind.KNOWLEDGE, MessageKind.MODEL_ACK)
LOG_BURST = 10  # rejections logged per reason and minute; the rest are counted
RETRY_SECONDS = (0.5, 1, 2, 5, 10)  # back-off while the database is unreachable
GAP = 0.005  # a pause in the stream this long closes the batch


@dataclass(frozen=True)
class Received:
    """One message as the broker delivered it."""

    topic: str
    payload: bytes
    mid: int
    qos: int


class IngestMetrics:
    """The ingest's Prometheus metrics, in a registry of its own (a process may run several ingests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            "diredi_ingest_received_total", "Messages received", ["kind"], registry=self.registry
        )
        self.rejected = Counter(
            "diredi_ingest_rejected_total", "Messages refused, by reason", ["reason"], registry=self.registry
        )
        self.stored = Counter(
            "diredi_ingest_stored_total",
            "Messages committed to the registry",
            ["kind"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "diredi_ingest_duplicates_total",
            "Messages whose msg_id was already stored (redeliveries)",
            ["kind"],
            registry=self.registry,
        )
        self.receipts = Counter("diredi_ingest_receipts_total", "Receipts published", registry=self.registry)
        self.database_errors = Counter(
            "diredi_ingest_database_errors_total",
            "Batches retried: database unreachable",
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "diredi_ingest_batch_seconds",
            "Time to write and commit one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "diredi_ingest_batch_messages",
            "Messages per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=self.registry,
        )
        self.backlog = Gauge(
            "diredi_ingest_backlog", "Messages received, not yet written", registry=self.registry
        )

    def value(self, name: str, **labels: str) -> float:
        """The current value of a counter (0 if never incremented), e.g. value("rejected", reason="topic")."""
        metric = {"received", "rejected", "stored", "duplicates", "receipts", "database_errors"}
        if name not in metric:
            raise ValueError(f"unknown metric {name}")
        return self.registry.get_sample_value(f"diredi_ingest_{name}_total", labels) or 0.0


class RejectionLog:
    """Logs each refused message once, with its reason, at most `burst` a minute per reason."""

    def __init__(self, burst: int = LOG_BURST, window: float = 60.0) -> None:
        self.burst = burst
        self.window = window
        self._started: dict[Rejection, float] = {}
        self._logged: Tally[Rejection] = Tally()
        self._suppressed: Tally[Rejection] = Tally()

    def __call__(self, topic: str, error: ContractError) -> None:
        now = time.monotonic()
        reason = error.reason
        if now - self._started.get(reason, -self.window) >= self.window:
            if self._suppressed[reason]:
                log.warning(
                    "%d more messages refused as %s in the last minute", self._suppressed[reason], reason
                )
            self._started[reason], self._logged[reason], self._suppressed[reason] = now, 0, 0
        if self._logged[reason] < self.burst:
            self._logged[reason] += 1
            log.warning("refused a message on %.200s (%s): %s", topic, reason, error)
        else:
            self._suppressed[reason] += 1


class Ingest:
    """One ingest process's worth of work: a broker session feeding a batch writer."""

    def __init__(
        self,
        target: BrokerTarget,
        sessions: sessionmaker[Session],
        *,
        name: str = "1",
        group: str = "diredi-ingest",
        batch_size: int = 1000,
        batch_ms: float = 50.0,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.target = target
        self.writer = BatchWriter(sessions)
        self.shared = target.protocol == "5"
        self.group = group
        self.batch_size = batch_size
        self.batch_wait = batch_ms / 1000
        self.metrics = metrics or IngestMetrics()
        self.client_id = f"diredi-ingest-{name}"
        self._refused = RejectionLog()
        self._inbox: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._worker: threading.Thread | None = None
        self._client = self._make_client()

    # The broker side ------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = self.target.client(self.client_id, persistent=True)
        client.manual_ack_set(True)
        client.max_queued_messages_set(0)  # receipts wait in the client rather than being dropped
        client.max_inflight_messages_set(100)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def subscriptions(self) -> list[str]:
        """The topic filters this ingest subscribes to."""
        group = self.group if self.shared else None
        filters = [device_filter(kind, shared_group=group) for kind in SHARED_KINDS]
        return [device_filter(MessageKind.PRESENCE), *filters]

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("the broker %s refused the ingest: %s", self.target, reason)
            return
        log.info(
            "connected to %s as %s (session present: %s)", self.target, self.client_id, flags.session_present
        )
        client.subscribe([(topic_filter, 1) for topic_filter in self.subscriptions()])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.error("the broker refused the ingest's subscriptions: %s", ", ".join(refused))
        else:
            log.info("subscribed to %s", ", ".join(self.subscriptions()))
            self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._subscribed.clear()
        if not self._stop.is_set():
            log.warning("lost the broker %s (%s); reconnecting", self.target, reason)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "<not UTF-8>"
        self._inbox.put(Received(topic, bytes(message.payload), message.mid, message.qos))

    # Running ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect and start writing in the background."""
        # Up to two batches unacknowledged in flight: enough to keep the writer busy, bounded memory.
        self.target.connect(self._client, persistent=True, receive_maximum=min(2 * self.batch_size, 65_535))
        self._client.loop_start()
        self._worker = threading.Thread(target=self._work, name=f"{self.client_id}-writer", daemon=True)
        self._worker.start()

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Whether the broker accepted the subscriptions within `timeout` seconds."""
        return self._subscribed.wait(timeout)

    def retire(self, timeout: float = 10.0) -> bool:
        """Drop this ingest's session in the broker for good (do not `start` it): its subscriptions
        go, and with them its share of the group's messages, which the broker would otherwise keep
        queueing for it until the session expires. Returns whether the broker confirmed."""
        client = self.target.client(self.client_id)
        connected = threading.Event()
        client.on_connect = lambda *args: connected.set()
        self.target.connect(client)  # clean start, no session expiry: the old session is discarded
        client.loop_start()
        confirmed = connected.wait(timeout)
        client.disconnect()
        client.loop_stop()
        return confirmed

    def stop(self, timeout: float = 10.0) -> None:
        """Write what was received, then disconnect (the session and its queued messages stay)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    def _work(self) -> None:
        while not self._stop.is_set() or not self._inbox.empty():
            batch = self._take()
            if batch:
                self._process(batch)

    def _take(self) -> list[Received]:
        """Up to `batch_size` messages: waits for a first one (at most 0.2 s), then takes what keeps
        arriving, until `batch_wait` has passed or the stream pauses for `GAP` seconds. (The broker
        lets only so many unacknowledged messages through at once, so waiting longer would not make
        the batch larger, only later.)"""
        try:
            batch = [self._inbox.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_size:
            try:
                batch.append(self._inbox.get_nowait())
                continue
            except queue.Empty:
                pass
            wait = min(GAP, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                batch.append(self._inbox.get(timeout=wait))
            except queue.Empty:
                break
        self.metrics.backlog.set(self._inbox.qsize())
        return batch

    def _process(self, batch: Sequence[Received]) -> None:
        accepted: list[Accepted] = []
        kinds: Tally[MessageKind] = Tally()
        for received in batch:
            try:
                kind, message = decode(received.topic, received.payload)
            except ContractError as invalid:
                self._refuse(received.topic, invalid)
                continue
            kinds[kind] += 1
            accepted.append(Accepted(kind, message, received.payload))
        for kind, count in kinds.items():
            self.metrics.received.labels(kind.value).inc(count)
        if accepted:
            written = self._write(accepted)
            if written is None:
                return  # stopping with the database down: unacknowledged, the broker keeps them
            for refused, error in written.refused:
                self._refuse(device_topic(refused.message.device_id, refused.kind), error)
            for kind, count in written.stored.items():
                self.metrics.stored.labels(kind.value).inc(count)
            for kind, count in written.duplicates.items():
                self.metrics.duplicates.labels(kind.value).inc(count)
            self._send_receipts(written.receipts)
        for received in batch:
            if received.qos > 0:
                self._client.ack(received.mid, received.qos)

    def _write(self, accepted: list[Accepted]) -> Written | None:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                written = self.writer.write(accepted)
            except OperationalError as exc:  # the database is unreachable: nothing committed, try again
                self.metrics.database_errors.inc()
                delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                log.error(
                    "could not write a batch of %d (%s); retrying in %s s", len(accepted), exc.orig, delay
                )
                attempt += 1
                if self._stop.wait(delay):
                    return None
                continue
            except Exception:  # a bug the checks did not foresee: one message must not stop the ingest
                if len(accepted) > 1:
                    log.exception("a batch of %d failed; writing its messages one by one", len(accepted))
                    return self._write_each(accepted)
                log.exception("refused a %s message of %s", accepted[0].kind, accepted[0].message.device_id)
                error = ContractError("the ingest could not store it (logged)", Rejection.refused)
                return Written(refused=[(accepted[0], error)])
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(accepted))
            return written

    def _write_each(self, accepted: list[Accepted]) -> Written | None:
        written = Written()
        for one in accepted:
            result = self._write([one])
            if result is None:
                return None
            written.add(result)
        return written

    def _refuse(self, topic: str, error: ContractError) -> None:
        self.metrics.rejected.labels(error.reason.value).inc()
        self._refused(topic, error)

    def _send_receipts(self, receipts: list[tuple[str, uuid.UUID]]) -> None:
        for device_id, ack_of in receipts:
            receipt = Receipt(device_id=device_id, ack_of=ack_of)
            self._client.publish(device_topic(device_id, MessageKind.RECEIPT), encode(receipt), qos=1)
        self.metrics.receipts.inc(len(receipts))
