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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from broker.client import BrokerTarget
from cloud.exceptions import LinkError
from cloud.ingest.link import Inbound, IngestLink
from cloud.ingest.writer import Accepted, BatchWriter, Written
from wire.errors import ContractError, Rejection
from wire.fastpath import decode_fast
from wire.messages import Receipt, encode
from wire.topics import MessageKind, device_filter, device_topic

log = logging.getLogger(__name__)

SHARED_KINDS = (MessageKind.STATUS, MessageKind.KNOWLEDGE, MessageKind.MODEL_ACK, MessageKind.CMD_RESULT)
LOG_BURST = 10  # rejections logged per reason and minute; the rest are counted
RETRY_SECONDS = (0.5, 1, 2, 5, 10)  # back-off while the database is unreachable


@dataclass(frozen=True)
class Job:
    """A validated batch on its way to the database, and what to acknowledge once it is committed."""

    epoch: int  # the connection it arrived on
    packet_ids: list[int]
    accepted: list[Accepted]


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
        self.batch_bytes = Histogram(
            "diredi_ingest_batch_bytes",
            "Payload bytes per batch taken from the broker",
            buckets=(1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22, 1 << 23, 1 << 24, 1 << 26),
            registry=self.registry,
        )
        self.connected = Gauge(
            "diredi_ingest_connected", "1 while connected to the broker", registry=self.registry
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
    """One ingest process's worth of work: a broker session feeding a batch writer, on one thread."""

    def __init__(
        self,
        target: BrokerTarget,
        sessions: sessionmaker[Session],
        *,
        name: str = "1",
        client_id: str | None = None,
        group: str = "diredi-ingest",
        batch_size: int = 1000,
        batch_bytes: int = 8 << 20,
        batch_ms: float = 50.0,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.target = target
        self.writer = BatchWriter(sessions)
        self.shared = target.protocol == "5"
        self.group = group
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.batch_wait = batch_ms / 1000
        self.metrics = metrics or IngestMetrics()
        # Its own account's bound client id when it has one, else named after the ingest.
        self.client_id = client_id or f"diredi-ingest-{name}"
        self._refused = RejectionLog()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._worker: threading.Thread | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=1)
        self._done: queue.SimpleQueue[tuple[Job, Written | None]] = queue.SimpleQueue()
        self._pending = 0  # batches handed to the database thread, not yet acknowledged
        # Up to two batches unacknowledged in flight: enough to keep the writer busy, bounded memory.
        receive_maximum = min(2 * batch_size, 65_535)
        self._link = IngestLink(target, self.client_id, self.subscriptions(), receive_maximum=receive_maximum)

    def subscriptions(self) -> list[str]:
        """The topic filters this ingest subscribes to."""
        group = self.group if self.shared else None
        filters = [device_filter(kind, shared_group=group) for kind in SHARED_KINDS]
        return [device_filter(MessageKind.PRESENCE), *filters]

    # Running ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect and start writing in the background (reconnecting whenever the broker is lost)."""
        self._worker = threading.Thread(target=self._run, name=f"{self.client_id}-writer", daemon=True)
        self._worker.start()

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Whether the broker accepted the login and subscriptions within `timeout` seconds."""
        return self._subscribed.wait(timeout)

    @property
    def running(self) -> bool:
        """Whether the writer thread is alive."""
        return self._worker is not None and self._worker.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, then disconnect (the session and its queued messages stay)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)

    def retire(self, timeout: float = 10.0) -> bool:
        """Drop this ingest's session in the broker for good (do not `start` it): its subscriptions
        go, and with them its share of the group's messages, which the broker would otherwise keep
        queueing for it until the session expires. Returns whether the broker confirmed."""
        link = IngestLink(self.target, self.client_id, self.subscriptions(), persistent=False)
        try:
            link.connect(timeout)  # clean start, no session expiry: the old session is discarded
        except LinkError as exc:
            log.error("could not retire %s: %s", self.client_id, exc)
            return False
        link.disconnect()
        return True

    def _run(self) -> None:
        writer = threading.Thread(target=self._write_loop, name=f"{self.client_id}-db", daemon=True)
        writer.start()
        attempt = 0
        while not self._stop.is_set():
            if not self._link.connected:
                try:
                    self._link.connect()
                except LinkError as exc:
                    delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                    log.error("%s; retrying in %s s", exc, delay)
                    attempt += 1
                    self._stop.wait(delay)
                    continue
                attempt = 0
                log.info(
                    "connected to %s as %s (session present: %s); subscribed to %s",
                    self.target,
                    self.client_id,
                    self._link.session_present,
                    ", ".join(self.subscriptions()),
                )
                self.metrics.connected.set(1)
                self._subscribed.set()
            try:
                self._finish()
                batch = self._take()
                if batch:
                    self._submit(batch)
            except LinkError as exc:
                self._subscribed.clear()
                self.metrics.connected.set(0)
                if not self._stop.is_set():
                    log.warning("%s; reconnecting (what was not acknowledged comes again)", exc)
            except Exception:
                # Not foreseen: start over from the broker's side (it delivers what was not
                # acknowledged again) rather than let the ingest die with the process still up.
                log.exception("the ingest failed; reconnecting in %s s", RETRY_SECONDS[-1])
                self._link.close()
                self._subscribed.clear()
                self.metrics.connected.set(0)
                self._stop.wait(RETRY_SECONDS[-1])
        self._jobs.put(None)
        writer.join()
        try:
            self._finish()
        except LinkError:
            pass  # not acknowledged: delivered again to the next session
        self._link.disconnect()
        self.metrics.connected.set(0)

    def _take(self) -> list[Inbound]:
        """Up to about `batch_size` messages and `batch_bytes` of payload: waits for a first one
        (briefly while a written batch waits for its acknowledgements), then for the rest until
        `batch_wait` has passed. The broker's in-flight window (2,000) is twice a batch, so a busy
        stream fills batches without waiting, and a quiet one shares one transaction among the
        messages of `batch_wait` (at 200 messages a second, closing a batch at every pause cost the
        ingest half a core in transactions). The byte bound keeps a stream of large knowledge reports
        (up to 256 KiB each: 500 MB in a window of 2,000) from being held all at once."""
        batch = self._link.receive(0.005 if self._pending else 0.2, self.batch_bytes)
        if not batch:
            return []
        size = sum(len(inbound.payload) for inbound in batch)
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_size and size < self.batch_bytes:
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            more = self._link.receive(wait, self.batch_bytes - size)
            batch.extend(more)
            size += sum(len(inbound.payload) for inbound in more)
        self.metrics.batch_bytes.observe(size)
        return batch

    def _submit(self, batch: Sequence[Inbound]) -> None:
        """Validate `batch` and hand it to the database thread, which writes it while the next batch
        is received and validated (waiting while the previous one is still queued)."""
        accepted: list[Accepted] = []
        kinds: Tally[MessageKind] = Tally()
        for inbound in batch:
            topic = inbound.topic.decode("utf-8", errors="replace")
            try:
                kind, message = decode_fast(topic, inbound.payload)
            except ContractError as invalid:
                self._refuse(topic, invalid)
                continue
            except Exception as exc:  # a gap in the contract's checks must not stop the ingest
                why = f"the contract's checks failed on it ({type(exc).__name__})"
                self._refuse(topic, ContractError(why, Rejection.invalid))
                continue
            kinds[kind] += 1
            accepted.append(Accepted(kind, message, inbound.payload))
        for kind, count in kinds.items():
            self.metrics.received.labels(kind.value).inc(count)
        self._pending += 1
        job = Job(self._link.epoch, [inbound.packet_id for inbound in batch], accepted)
        while True:
            try:
                self._jobs.put(job, timeout=1.0)
                return
            except queue.Full:  # the database is slow or down: keep the broker from thinking us dead
                self._link.ping_if_due()

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._done.put((job, self._write(job.accepted) if job.accepted else Written()))

    def _finish(self) -> None:
        """Receipts, then acknowledgements, for every batch the database thread has committed."""
        while True:
            try:
                job, written = self._done.get_nowait()
            except queue.Empty:
                return
            self._pending -= 1
            if written is None:
                continue  # stopping with the database down: unacknowledged, the broker keeps them
            for refused, error in written.refused:
                self._refuse(device_topic(refused.message.device_id, refused.kind), error)
            for kind, count in written.stored.items():
                self.metrics.stored.labels(kind.value).inc(count)
            for kind, count in written.duplicates.items():
                self.metrics.duplicates.labels(kind.value).inc(count)
            if job.epoch != self._link.epoch:
                continue  # received on an earlier connection: the broker delivers it again, stored once
            self._send_receipts(written.receipts)
            self._link.ack(job.packet_ids)

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
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(accepted))
            return written

    def _refuse(self, topic: str, error: ContractError) -> None:
        self.metrics.rejected.labels(error.reason.value).inc()
        self._refused(topic, error)

    def _send_receipts(self, receipts: list[tuple[str, uuid.UUID]]) -> None:
        for device_id, ack_of in receipts:
            receipt = Receipt(device_id=device_id, ack_of=ack_of)
            self._link.publish(device_topic(device_id, MessageKind.RECEIPT), encode(receipt))
        self.metrics.receipts.inc(len(receipts))
