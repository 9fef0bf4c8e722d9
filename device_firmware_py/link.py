"""The daemon's MQTT link (DESIGN §2): the device's own credentials and client id, optional TLS, a
persistent session, a retained `online` presence whose will is `offline` with the same `conn` and
`sent_at`, and reconnects with exponential back-off and jitter.

paho's network loop runs on a thread of this class; whatever arrives (desired model, receipt,
command) is put, raw, on the inbox for the daemon's main thread, which validates and acts on it.
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from broker.client import BrokerTarget, ClientOptions, build_client, connect_async
from wire.common import utcnow
from wire.messages import Presence, PresenceState, encode
from wire.topics import DEVICE_SUBSCRIBES, TRUST_TOPIC, MessageKind, device_topic

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
SESSION_EXPIRY_S = 7 * 86_400  # the broker keeps a device's session (and its queued commands) a week


@dataclass(frozen=True)
class Inbound:
    """A message the cloud sent this device, as received."""

    topic: str
    payload: bytes


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before reconnect `attempt` (0-based): doubling from 1 s up to 60 s, each drawn
    between half and all of it, so a fleet that lost its broker does not come back in one wave."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(attempt, 16))
    return rng.uniform(ceiling / 2, ceiling)


class DeviceLink:
    """One device's connection to the broker, kept up until `stop`."""

    def __init__(
        self, target: BrokerTarget, device_id: str, inbox: queue.Queue[Inbound], *, keepalive: int = 30
    ) -> None:
        self.target = target
        self.device_id = device_id
        self.inbox = inbox
        self.keepalive = keepalive
        self.connections = 0  # sessions established so far; the daemon re-sends its spool on each
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()  # noqa: S311 (jitter, not a secret)
        self._conn = ""
        self._presence_at = utcnow()
        self._lock = threading.Lock()
        self._was_up = False  # whether the current connection got as far as CONNACK
        # The will changes with every connection (`_run`); the reconnects are this class's own.
        self._options = ClientOptions(
            device_id, persistent=True, session_expiry=SESSION_EXPIRY_S, keepalive=keepalive
        )
        self._client = self._new_client()

    # Lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background, and keep reconnecting until `stop`."""
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Say `offline` (retained) and disconnect cleanly: the broker then drops the will."""
        self._stop.set()
        if self._connected.is_set():
            info = self._publish(self._presence(PresenceState.offline), retain=True)
            if info is not None:
                try:
                    info.wait_for_publish(min(timeout, 2.0))
                except (RuntimeError, ValueError):
                    pass
            with self._lock:
                self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def connected(self) -> bool:
        """Whether a session is up now."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Whether a session came up within `timeout` seconds."""
        return self._connected.wait(timeout)

    def publish(self, kind: MessageKind, payload: bytes, *, qos: int = 1) -> bool:
        """Publish on this device's `kind` topic; False when not connected (the spool keeps what must
        arrive and sends it again later)."""
        return self.send(device_topic(self.device_id, kind), payload, qos=qos)

    def send(self, topic: str, payload: bytes, *, qos: int = 1) -> bool:
        """Publish on `topic` (one of this device's, as the spool kept it); False when not connected."""
        if not self._connected.is_set():
            return False
        return self._publish((topic, payload), qos=qos) is not None

    # The network thread ----------------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        client = build_client(self.target, self._options)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _presence(self, state: PresenceState) -> tuple[str, bytes]:
        presence = Presence(device_id=self.device_id, state=state, conn=self._conn, sent_at=self._presence_at)
        return device_topic(self.device_id, MessageKind.PRESENCE), encode(presence)

    def _publish(self, message: tuple[str, bytes], *, qos: int = 1, retain: bool = False) -> Any:
        topic, payload = message
        with self._lock:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("publish on %s failed: %s", topic, mqtt.error_string(info.rc))
            return None
        return info

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            # A new connection id and time for every connection: the will registered now is `offline`
            # for exactly this connection, and the `online` sent after CONNACK has the same stamp.
            self._conn, self._presence_at = secrets.token_hex(8), utcnow()
            topic, payload = self._presence(PresenceState.offline)
            try:
                with self._lock:
                    self._client.will_set(topic, payload, qos=1, retain=True)
                    self._connect()
            except (OSError, ValueError) as exc:  # refused, unreachable, timed out, a bad TLS setup
                delay = backoff_delay(attempt, self._rng)
                log.warning("cannot reach the broker %s (%s); retrying in %.1f s", self.target, exc, delay)
                attempt += 1
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.5)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            if self._stop.is_set():
                break
            self._connected.clear()
            attempt = 0 if self._was_up else attempt + 1
            delay = backoff_delay(attempt, self._rng)
            log.warning("lost the broker %s; reconnecting in %.1f s", self.target, delay)
            self._stop.wait(delay)
        # Stopping: let paho finish sending what stop() queued (offline presence, DISCONNECT).
        for _ in range(10):
            if self._client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
        self._connected.clear()

    def _connect(self) -> None:
        self._was_up = False
        connect_async(self._client, self.target, self._options)
        self._client.reconnect()  # at once, on this thread: an error is this attempt's failure

    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            log.error("the broker %s refused the connection: %s", self.target, reason)
            return
        self._was_up = True
        self.connections += 1
        log.info("connected to %s as %s (connection %s)", self.target, self.device_id, self._conn)
        topics = [device_topic(self.device_id, kind) for kind in DEVICE_SUBSCRIBES] + [TRUST_TOPIC]
        client.subscribe([(topic, 1) for topic in topics])
        topic, payload = self._presence(PresenceState.online)
        client.publish(topic, payload, qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: object, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from %s: %s", self.target, reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        self.inbox.put(Inbound(message.topic, bytes(message.payload)))
