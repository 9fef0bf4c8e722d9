"""Thousands of simulated devices in one process: paho clients driven by one selector loop (paho's
external-loop API: `socket()`, `loop_read()`, `loop_write()` and `loop_misc()`), no thread per device.

Each device logs in with its own id and secret (or, a certificate device, with its certificate and key
on a mutual-TLS listener), leaves a retained `offline` will, announces itself `online` (retained,
QoS 1, the will's `conn` and `sent_at`) and sends a status heartbeat every `heartbeat_s` seconds with
±10 % jitter. `drop` closes connections without a DISCONNECT, as a device whose process dies does:
the broker then publishes their wills.

On a TLS listener the loop drives every device's handshake itself, without blocking, so that many are
under way at once: paho 2.2 completes it inside `reconnect()`, blocking, one device at a time.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
import secrets
import selectors
import ssl
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.client import BrokerTarget, ClientOptions, build_client, connect_async
from wire.common import utcnow
from wire.messages import Presence, PresenceState, Status, encode
from wire.topics import MessageKind, device_topic

JITTER = 0.1  # a heartbeat interval is heartbeat_s × (1 ± JITTER)
MISC_EVERY = 1.0  # seconds between two `loop_misc` rounds (keepalive pings)
CONNECT_WINDOW = 100  # connections awaiting their CONNACK at once (mosquitto listens with a backlog of 100)


@dataclass(eq=False)
class SimDevice:
    """One simulated device and what happened to it."""

    device_id: str
    client: mqtt.Client
    options: ClientOptions
    conn: str = ""
    connect_started: float = 0.0
    handshaking: bool = False  # its TLS handshake is under way (the loop drives it, not paho)
    handshake_at: float | None = None  # when its TLS handshake completed
    connack_at: float | None = None
    refused: str | None = None  # why the broker refused the connection, or it failed
    online: bool = False
    dropped: bool = False
    heartbeats: int = 0
    inflight: dict[int, MessageKind] = field(default_factory=dict)  # QoS 1 mid → what it was


@dataclass
class Counters:
    """Totals over the swarm's life."""

    heartbeats_sent: int = 0
    heartbeats_acked: int = 0  # QoS 1: PUBACK received; QoS 0: written to the socket
    presence_acked: int = 0
    refused_publishes: int = 0  # QoS 1 publishes the broker answered with a failure (e.g. not authorised)
    lost: int = 0  # connections that ended without `drop` asking for it
    # TLS handshakes that failed, and TLS connections the broker closed before its CONNACK: under TLS 1.3
    # the broker refuses a client certificate after the client has finished its half of the handshake.
    handshake_failures: int = 0


class _HandshakeInLoop(ssl.SSLSocket):
    """A TLS socket on which paho's own call to `do_handshake` (blocking, inside `reconnect()`) does
    nothing: the swarm's loop completes the handshake with `ssl.SSLSocket.do_handshake`."""

    def do_handshake(self, block: bool = False) -> None:
        """Nothing here: see the class."""


def tls_context(target: BrokerTarget) -> ssl.SSLContext:
    """What `broker.client.build_client` makes for a TLS target (the broker verified against its CA,
    the device's certificate chain if it has one), with the handshake left to the swarm's loop."""
    context = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None)
    if target.client_cert is not None:
        context.load_cert_chain(*target.client_cert)
    context.sslsocket_class = _HandshakeInLoop
    return context


class Swarm:
    """The simulated fleet: connect it, run its loop for a while, drop some devices abruptly."""

    def __init__(
        self,
        target: BrokerTarget,
        secrets_by_id: Mapping[str, str],
        *,
        certificates: Mapping[str, tuple[Path, Path]] | None = None,
        heartbeat_s: float = 10.0,
        qos: int = 1,
        keepalive: int = 60,
        model_id: str | None = None,
        seed: int = 0,
    ) -> None:
        self.target = target
        self.model_id = model_id
        self.heartbeat_s = heartbeat_s
        self.qos = qos
        self.keepalive = keepalive
        self.heartbeats_paused = False
        self.counters = Counters()
        self._random = random.Random(seed)  # noqa: S311 (jitter, not security)
        self._selector = selectors.DefaultSelector()
        self._due: list[tuple[float, int, SimDevice]] = []  # heartbeat heap
        self._sequence = itertools.count()
        self._next_misc = 0.0
        self._online: dict[str, Presence] = {}  # the online message of each connection being made
        # Password devices log in with their secret, certificate devices with their (certificate, key).
        self.devices = [self._make(device_id, secret) for device_id, secret in secrets_by_id.items()]
        self.devices += [
            self._device(device_id, target.with_certificate(*files))
            for device_id, files in (certificates or {}).items()
        ]

    # Set-up ---------------------------------------------------------------------------------------

    def _make(self, device_id: str, secret: str) -> SimDevice:
        return self._device(device_id, self.target.with_credentials(device_id, secret))

    def _device(self, device_id: str, target: BrokerTarget) -> SimDevice:
        options = ClientOptions(device_id, keepalive=self.keepalive)
        client = build_client(dataclasses.replace(target, tls=False), options)
        if target.tls:
            client.tls_set_context(tls_context(target))
        device = SimDevice(device_id, client, options)
        client.user_data_set(device)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return device

    def connect_all(self, on_answer: Callable[[SimDevice], None] | None = None, timeout: float = 120) -> None:
        """Connect every device, at most `CONNECT_WINDOW` waiting for their CONNACK at once; returns
        when each one was answered (or failed) or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        waiting: set[SimDevice] = set()
        queue = list(reversed(self.devices))
        while (queue or waiting) and time.monotonic() < deadline:
            while queue and len(waiting) < CONNECT_WINDOW:
                device = queue.pop()
                self._connect(device)
                waiting.add(device)
            self.run_for(0.01)
            answered = {d for d in waiting if d.connack_at is not None or d.refused is not None}
            waiting -= answered
            for device in answered:
                if on_answer is not None:
                    on_answer(device)
        for device in [*waiting, *queue]:
            device.refused = device.refused or f"no CONNACK within {timeout:g} s"

    def _connect(self, device: SimDevice) -> None:
        # The will and the online message share conn and sent_at (DESIGN §2's rule).
        device.conn = secrets.token_hex(8)
        at = utcnow()
        will = Presence(device_id=device.device_id, state=PresenceState.offline, conn=device.conn, sent_at=at)
        device.client.will_set(self._topic(device, MessageKind.PRESENCE), encode(will), qos=1, retain=True)
        device.connect_started = time.monotonic()
        device.handshaking = self.target.tls
        self._online[device.device_id] = Presence(
            device_id=device.device_id, state=PresenceState.online, conn=device.conn, sent_at=at
        )
        try:
            connect_async(device.client, self.target, device.options)
            device.client.reconnect()  # opens the socket now: `_on_socket_open` registers it
        except OSError as exc:
            device.refused = f"connect: {exc}"

    @staticmethod
    def _topic(device: SimDevice, kind: MessageKind) -> str:
        return device_topic(device.device_id, kind)

    # Running --------------------------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        """Serve the network, heartbeats and keepalives for `seconds`."""
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            self._send_due(now)
            if now >= self._next_misc:
                self._next_misc = now + MISC_EVERY
                for device in self.devices:
                    if device.online:
                        device.client.loop_misc()
            if now >= end:
                return
            wait = min(end, self._next_misc, self._due[0][0] if self._due else end) - now
            for key, events in self._selector.select(max(wait, 0.0)):
                device = key.data
                if device.dropped:
                    continue
                if device.handshaking:
                    self._handshake(device, key.fileobj)
                    continue
                if events & selectors.EVENT_READ:
                    self._read(device, key.fileobj)
                if events & selectors.EVENT_WRITE:
                    device.client.loop_write()

    def _handshake(self, device: SimDevice, sock: Any) -> None:
        """One step of a device's TLS handshake; once done, paho writes its CONNECT."""
        try:
            ssl.SSLSocket.do_handshake(sock)
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, device)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)
            return
        except OSError as exc:  # ssl.SSLError among them: the broker refused the certificate
            self.counters.handshake_failures += 1
            device.handshaking = False
            device.refused = f"TLS handshake: {exc}"
            self._unregister(sock)
            sock.close()
            return
        device.handshaking = False
        device.handshake_at = time.monotonic()
        self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def _read(self, device: SimDevice, sock: Any) -> None:
        device.client.loop_read()
        # A TLS record read in part stays in the socket's buffer, where select would not see it.
        while isinstance(sock, ssl.SSLSocket) and sock.fileno() >= 0 and sock.pending() > 0:
            device.client.loop_read()

    def _send_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            _, _, device = heapq.heappop(self._due)
            if not device.online or device.dropped:
                continue
            if not self.heartbeats_paused:
                self._heartbeat(device)
            interval = self.heartbeat_s * self._random.uniform(1 - JITTER, 1 + JITTER)
            self._schedule(device, now + interval)

    def _schedule(self, device: SimDevice, due: float) -> None:
        heapq.heappush(self._due, (due, next(self._sequence), device))

    def _heartbeat(self, device: SimDevice) -> None:
        device.heartbeats += 1
        uptime = max(time.monotonic() - (device.connack_at or 0.0), 0.0)
        status = Status(
            device_id=device.device_id,
            model_id=self.model_id,
            uptime_s=round(uptime, 3),
            inference_count=device.heartbeats * 20,
            latency_p50_ms=4.1,
            latency_p95_ms=7.9,
            mean_confidence=0.93,
            class_histogram={str(c): device.heartbeats + c for c in range(10)},
            cpu_percent=23.5,
            mem_bytes=61_234_567,
            temp_c=48.5,
        )
        self._publish(device, MessageKind.STATUS, encode(status), qos=self.qos)
        self.counters.heartbeats_sent += 1

    def _publish(
        self, device: SimDevice, kind: MessageKind, payload: bytes, *, qos: int, retain: bool = False
    ) -> None:
        info = device.client.publish(self._topic(device, kind), payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            device.inflight[info.mid] = kind

    def drop(self, devices: Iterable[SimDevice]) -> None:
        """Close these devices' sockets without a DISCONNECT (their wills then go out)."""
        for device in devices:
            sock = device.client.socket()
            device.dropped, device.online = True, False
            if sock is None:
                continue
            self._unregister(sock)
            sock.close()

    def close(self) -> None:
        """Disconnect every device still connected (a clean DISCONNECT: no will) and end the loop."""
        for device in self.devices:
            if device.online and not device.dropped:
                device.online = False
                device.client.disconnect()
        self.run_for(0.5)
        for device in self.devices:
            sock = device.client.socket()
            if sock is not None and not device.dropped:
                self._unregister(sock)
                sock.close()
        self._selector.close()

    # paho callbacks -------------------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        device: SimDevice,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        online = self._online.pop(device.device_id)
        if reason.is_failure:
            device.refused = str(reason)
            return
        device.connack_at = time.monotonic()
        device.online = True
        self._publish(device, MessageKind.PRESENCE, encode(online), qos=1, retain=True)
        self._schedule(device, device.connack_at + self._random.uniform(0, self.heartbeat_s))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        device: SimDevice,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if device.online and not device.dropped:
            self.counters.lost += 1
            device.refused = device.refused or f"disconnected: {reason}"
        elif device.connack_at is None and device.refused is None:  # no CONNACK at all
            if device.handshake_at is not None:
                self.counters.handshake_failures += 1
            device.refused = f"disconnected before its CONNACK: {reason}"
        device.online = False

    def _on_publish(
        self, client: mqtt.Client, device: SimDevice, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        kind = device.inflight.pop(mid, None)
        if reason.is_failure:
            self.counters.refused_publishes += 1
        elif kind is MessageKind.STATUS:
            self.counters.heartbeats_acked += 1
        elif kind is MessageKind.PRESENCE:
            self.counters.presence_acked += 1

    def _on_socket_open(self, client: mqtt.Client, device: SimDevice, sock: Any) -> None:
        # A handshake starts by writing the ClientHello.
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if device.handshaking else 0)
        self._selector.register(sock, events, device)

    def _on_socket_close(self, client: mqtt.Client, device: SimDevice, sock: Any) -> None:
        self._unregister(sock)

    def _on_register_write(self, client: mqtt.Client, device: SimDevice, sock: Any) -> None:
        if device.handshaking:
            return  # the handshake decides what to wait for; when done, it lets paho write
        self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def _on_unregister_write(self, client: mqtt.Client, device: SimDevice, sock: Any) -> None:
        try:
            self._selector.modify(sock, selectors.EVENT_READ, device)
        except (KeyError, ValueError):
            pass  # already unregistered: the socket is closing

    def _unregister(self, sock: Any) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass


def connected(devices: Collection[SimDevice]) -> list[SimDevice]:
    """The devices whose connection is up."""
    return [d for d in devices if d.online and not d.dropped]
