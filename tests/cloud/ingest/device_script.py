"""A scripted device for the ingest tests, and the set-up they share.

`ScriptedDevice` follows the device's side of DESIGN §2 with real paho, like the daemon will: its own
client id and credentials, a persistent session subscribed to its receipt topic, a retained `online`
presence whose will is `offline` with the same `conn` (a new one per connection), and an in-memory
spool of the knowledge reports and acks it sent, each re-sent (same msg_id, same bytes) every
`resend_after` seconds until its receipt arrives. It reconnects by itself when the broker goes away,
and can drop its connection the way a crashed device does (no DISCONNECT: the broker sends the will).

Its network loop is a thread of its own rather than paho's `loop_start`, so that `drop` can end the
connection without paho saying goodbye first, and resends run on that same thread.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.orm import Session, sessionmaker

from broker.client import BrokerTarget, ClientOptions, build_client, connect_async
from cloud.artifacts import ArtifactStore
from cloud.registry import models
from tests.brokers import Probe, RunningBroker, provisioned_device
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model
from tests.polling import wait_until
from wire.common import utcnow
from wire.knowledge import KnowledgeReport
from wire.messages import (
    AckResult,
    ModelAck,
    Presence,
    PresenceState,
    Receipt,
    Status,
    decode,
    encode,
)
from wire.topics import MessageKind, device_topic


def end_session(target: BrokerTarget, client_id: str) -> None:
    """Discard the broker's persistent session of `client_id` (its subscriptions and queued messages):
    connect once with a clean session that expires at once, then disconnect."""
    with Probe(target, client_id, persistent=False) as probe:
        reason = probe.connect()
        assert reason is not None and not reason.is_failure, f"could not end {client_id}'s session: {reason}"


@dataclass(frozen=True)
class Enrolled:
    """A cohort with an approved edge model and devices known to the registry and the broker."""

    cohort: str
    edge_model: str
    secrets: dict[str, str]  # device id → its broker secret

    @property
    def devices(self) -> list[str]:
        return list(self.secrets)


def enrol(
    sessions: sessionmaker[Session], store: ArtifactStore, broker: RunningBroker, count: int
) -> Enrolled:
    """A new cohort (a random id: the session's broker and a module's database are shared) with an
    approved edge model, and `count` devices provisioned in the registry and in the broker."""
    cohort = f"line-{secrets.token_hex(4)}"
    device_ids = [f"{cohort}-cam{i}" for i in range(count)]
    with sessions() as session, session.begin():
        make_cohort(session, cohort)
        teacher = make_cloud_model(session, store, cohort)
        edge = make_edge_model(session, store, teacher_id=teacher.id, cohort_id=cohort)
        models.decide(session, edge.id, approve=True)
        for device_id in device_ids:
            make_device(session, device_id, cohort)
        edge_id = edge.id
    return Enrolled(cohort, edge_id, {d: provisioned_device(broker, d) for d in device_ids})


@dataclass
class Spooled:
    """A message kept until its receipt arrives."""

    topic: str
    payload: bytes
    last_sent: float  # time.monotonic() of the latest (re)send
    sends: int = 1


@dataclass
class Tally:
    """What happened to a device, for the tests' assertions and failure messages."""

    connects: int = 0
    resends: int = 0
    receipts: list[Receipt] = field(default_factory=list)
    stray_receipts: int = 0  # receipts of nothing in the spool (a second receipt of a re-sent report)
    foreign: list[str] = field(default_factory=list)  # topics of messages it never subscribed to


class ScriptedDevice:
    """One device on the broker (see the module docstring). Use as a context manager, or `close()`."""

    def __init__(
        self,
        target: BrokerTarget,
        device_id: str,
        *,
        resend_after: float = 30.0,
        reconnect_after: float = 0.25,
        keepalive: int = 10,
        on_receipt: Callable[[Receipt], None] | None = None,
    ) -> None:
        self.target = target
        self.device_id = device_id
        self.resend_after = resend_after
        self.reconnect_after = reconnect_after
        self.keepalive = keepalive
        self.on_receipt = on_receipt
        self.tally = Tally()
        self.conn = ""  # the current connection's id, as its presence and will carry it
        self._spool: dict[uuid.UUID, Spooled] = {}
        self._lock = threading.Condition()
        self._ready = threading.Event()  # connected, and subscribed to the receipt topic
        self._stopping = threading.Event()
        self._linked = False  # a TCP connection exists (paho's network loop may run)
        self._online_at: datetime = utcnow()
        self._receipt_topic = device_topic(device_id, MessageKind.RECEIPT)
        self._options = ClientOptions(device_id, persistent=True, keepalive=keepalive)
        self._client = build_client(target, self._options)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._network = threading.Thread(target=self._run, name=f"device-{device_id}", daemon=True)

    # Life cycle ------------------------------------------------------------------------------------

    def __enter__(self) -> ScriptedDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> ScriptedDevice:
        """Connect (presence `online`, retained), subscribe to the receipt topic, and return once both
        are done; from then on the device keeps itself connected until `close` or `drop`."""
        connect_async(self._client, self.target, self._options)
        self._network.start()
        if not self._ready.wait(timeout):
            raise AssertionError(
                f"{self.device_id} not connected and subscribed to its receipts after {timeout:g} s "
                f"({self.tally.connects} CONNACKs)"
            )
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait until the device is connected again (after the broker came back)."""
        if not self._ready.wait(timeout):
            raise AssertionError(f"{self.device_id} did not reconnect within {timeout:g} s")

    def freeze(self) -> None:
        """Stop talking but leave the connection open, like a device that hung: the broker ends it
        after 1.5 keepalives, or when another connection takes the client id over. The device stays
        down."""
        self._stopping.set()
        self._network.join(5)
        self._ready.clear()

    def drop(self) -> None:
        """End the connection as a crashed device would: the socket closes without a DISCONNECT, so the
        broker publishes the will. The device stays down."""
        self.freeze()
        self._close_socket()

    def close(self) -> None:
        """Disconnect cleanly (no will) and stop the network thread."""
        stopped = self._stopping.is_set()  # frozen or dropped: no goodbye
        self._stopping.set()
        if self._network.is_alive():
            self._network.join(5)
        if self._linked and not stopped:
            self._client.disconnect()  # no network thread any more: paho writes it from here
        self._close_socket()
        self._ready.clear()

    def _close_socket(self) -> None:
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the broker
            sock.close()

    # Sending ---------------------------------------------------------------------------------------

    def publish_status(self, **fields: Any) -> Status:
        """A status heartbeat (QoS 1; not spooled: the next one supersedes it)."""
        status = Status(device_id=self.device_id, uptime_s=60.0, **fields)
        self._client.publish(device_topic(self.device_id, MessageKind.STATUS), encode(status), qos=1)
        return status

    def publish_raw(self, kind: MessageKind, payload: bytes, timeout: float = 5.0) -> None:
        """Publish any bytes on one of this device's topics and wait for the broker's PUBACK."""
        info = self._client.publish(device_topic(self.device_id, kind), payload, qos=1)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"{self.device_id}: no PUBACK for a {kind} message in {timeout:g} s"

    def send_report(self, payload: bytes) -> uuid.UUID:
        """Spool and send a knowledge report (its bytes as built, e.g. by `knowledge_payload`)."""
        _, report = decode(device_topic(self.device_id, MessageKind.KNOWLEDGE), payload)
        assert isinstance(report, KnowledgeReport) and report.device_id == self.device_id
        return self._send(MessageKind.KNOWLEDGE, report.msg_id, payload)

    def send_ack(self, model_id: str, result: AckResult = AckResult.installed, **fields: Any) -> ModelAck:
        """Spool and send a model ack."""
        ack = ModelAck(device_id=self.device_id, model_id=model_id, result=result, **fields)
        self._send(MessageKind.MODEL_ACK, ack.msg_id, encode(ack))
        return ack

    def _send(self, kind: MessageKind, msg_id: uuid.UUID, payload: bytes) -> uuid.UUID:
        topic = device_topic(self.device_id, kind)
        with self._lock:
            self._spool[msg_id] = Spooled(topic, payload, time.monotonic())
        # While disconnected paho keeps it and sends it on reconnection; the resend covers the rest.
        self._client.publish(topic, payload, qos=1)
        return msg_id

    # Receipts --------------------------------------------------------------------------------------

    def unreceipted(self) -> set[uuid.UUID]:
        """The msg_ids still in the spool."""
        with self._lock:
            return set(self._spool)

    def wait_all_receipted(self, timeout: float) -> None:
        """Wait until the spool is empty; fail naming what is still in it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._spool:
                left = deadline - time.monotonic()
                if left <= 0:
                    waiting = sorted(str(m) for m in self._spool)
                    raise AssertionError(
                        f"{self.device_id}: {len(waiting)} message(s) without a receipt after {timeout:g} s "
                        f"(connected: {self._ready.is_set()}, resends: {self.tally.resends}, receipts: "
                        f"{len(self.tally.receipts)}): {', '.join(waiting[:5])}"
                    )
                self._lock.wait(left)

    # The network thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._linked:
                self._new_connection()
                try:
                    self._client.reconnect()
                    self._linked = True
                except OSError:
                    self._stopping.wait(self.reconnect_after)
                    continue
            if self._client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                self._linked = False  # lost (or refused): connect again after a pause
                self._ready.clear()
                self._stopping.wait(self.reconnect_after)
                continue
            self._resend_due()

    def _new_connection(self) -> None:
        """A new `conn`, and the will that goes with it, stamped with the moment its `online` carries."""
        self.conn = secrets.token_hex(6)
        self._online_at = utcnow()
        will = Presence(
            device_id=self.device_id, state=PresenceState.offline, conn=self.conn, sent_at=self._online_at
        )
        self._client.will_set(device_topic(self.device_id, MessageKind.PRESENCE), encode(will), 1, True)

    def _resend_due(self) -> None:
        if not self._ready.is_set():
            return
        now = time.monotonic()
        with self._lock:
            due = [s for s in self._spool.values() if now - s.last_sent >= self.resend_after]
            for spooled in due:
                spooled.last_sent, spooled.sends = now, spooled.sends + 1
            self.tally.resends += len(due)
        for spooled in due:
            self._client.publish(spooled.topic, spooled.payload, qos=1)

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, properties: object
    ) -> None:
        if reason.is_failure:
            return
        self.tally.connects += 1
        online = Presence(
            device_id=self.device_id, state=PresenceState.online, conn=self.conn, sent_at=self._online_at
        )
        client.publish(device_topic(self.device_id, MessageKind.PRESENCE), encode(online), qos=1, retain=True)
        # Every time: a broker that died before saving the session has forgotten the subscription.
        client.subscribe(self._receipt_topic, qos=1)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: list[ReasonCode], properties: object
    ) -> None:
        if not any(r.is_failure for r in reasons):
            self._ready.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, properties: object
    ) -> None:
        self._ready.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic != self._receipt_topic:
            self.tally.foreign.append(message.topic)  # a broker that broke its ACL; the tests check
            return
        _, receipt = decode(message.topic, bytes(message.payload))
        assert isinstance(receipt, Receipt)
        if self.on_receipt is not None:
            self.on_receipt(receipt)
        with self._lock:
            self.tally.receipts.append(receipt)
            if self._spool.pop(receipt.ack_of, None) is None:
                self.tally.stray_receipts += 1
            self._lock.notify_all()


def wait_all_receipted(devices: Iterable[ScriptedDevice], timeout: float) -> None:
    """Wait until every device's spool is empty; fail saying how many each still holds."""
    fleet = list(devices)

    def missing() -> str:
        left = {d.device_id: (len(d.unreceipted()), d.tally.resends) for d in fleet if d.unreceipted()}
        return "messages without a receipt (device: (left, resends so far)): " + repr(left)

    wait_until(lambda: not any(d.unreceipted() for d in fleet), timeout, missing)
