"""The ingest's MQTT connection: a lean subscriber for one purpose, many QoS 1 messages in, few out.

Why not paho (which the devices and the other cloud parts use): on this machine paho's receive path
alone tops out near 7,700 QoS 1 messages a second — it reads a packet in several one-byte system
calls and runs its callbacks on a thread of its own that contends for the interpreter with the
writer — while mosquitto passes 19,000–28,000 through. This link reads what the socket has in one
call, parses every complete packet in the buffer, and acknowledges a whole batch in one write; it
runs on the caller's thread. It speaks MQTT 5 (mosquitto) and 3.1.1 (the embedded broker), over TCP
or TLS, and implements what the ingest needs and nothing more: CONNECT with a persistent session,
SUBSCRIBE at QoS 1, PUBLISH in at QoS 0/1 with manual PUBACK, PUBLISH out at QoS 1 (receipts) with
re-sending after a reconnect, keepalive, DISCONNECT.
"""

import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from broker.client import BrokerTarget
from cloud.exceptions import LinkError

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
READ_SIZE = 1 << 18
SESSION_EXPIRY = 86_400  # seconds the broker keeps an MQTT 5 session of a disconnected ingest


@dataclass(frozen=True, slots=True)
class Inbound:
    """One PUBLISH from the broker."""

    topic: bytes  # as sent; the wire contract decodes it
    payload: bytes
    packet_id: int  # 0 for QoS 0 (nothing to acknowledge)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


class IngestLink:
    """One connection to the broker. Not thread-safe: one thread connects, receives, acks, publishes."""

    def __init__(
        self,
        target: BrokerTarget,
        client_id: str,
        subscriptions: list[str],
        *,
        persistent: bool = True,
        receive_maximum: int = 2000,
        keepalive: int = 30,
    ) -> None:
        self.target = target
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.persistent = persistent
        self.receive_maximum = receive_maximum
        self.keepalive = keepalive
        self.v5 = target.protocol == "5"
        self.session_present = False
        self.epoch = 0  # counts successful connections: packet ids mean something only within one
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._early: list[Inbound] = []  # messages that came before the SUBACK
        self._last_sent = 0.0
        self._next_id = 0
        self._unacked: dict[int, tuple[bytes, bytes]] = {}  # our QoS 1 publishes: id → (topic, payload)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def unacked(self) -> int:
        """Our publishes the broker has not acknowledged yet."""
        return len(self._unacked)

    # Connecting -----------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, log in, subscribe; re-send our unacknowledged publishes. Raises LinkError."""
        self.close()
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((self.target.host, self.target.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.target.tls:
                ca = str(self.target.ca_file) if self.target.ca_file else None
                sock = ssl.create_default_context(cafile=ca).wrap_socket(
                    sock, server_hostname=self.target.host
                )
            sock.setblocking(False)
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"cannot reach the broker {self.target}: {exc}") from None
        self._sock, self._buffer, self._early = sock, bytearray(), []
        try:
            self._send(self._connect_packet())
            connack = self._expect(CONNACK, deadline)
            self._check_connack(connack)
            self._send(self._subscribe_packet())
            if not self.session_present:
                self._check_suback(self._expect(SUBACK, deadline))
            # A resumed session already holds the subscriptions, and the broker sends its in-flight
            # window before it reads our SUBSCRIBE: the SUBACK comes behind those messages, which
            # `receive` takes within its byte budget, and is checked when it comes.
            for packet_id, (topic, payload) in self._unacked.items():
                self._send(self._publish_packet(topic, payload, packet_id, dup=True))
            self.epoch += 1
        except BaseException:
            self.close()
            raise

    def _connect_packet(self) -> bytes:
        flags = 0x00 if self.persistent else 0x02  # clean start / clean session
        if self.target.username is not None:
            flags |= 0x80
            if self.target.password is not None:
                flags |= 0x40
        body = _string("MQTT") + bytes([5 if self.v5 else 4, flags]) + struct.pack("!H", self.keepalive)
        if self.v5:
            props = b"\x21" + struct.pack("!H", self.receive_maximum)
            if self.persistent:
                props = b"\x11" + struct.pack("!I", SESSION_EXPIRY) + props
            body += _varint(len(props)) + props
        body += _string(self.client_id)
        if self.target.username is not None:
            body += _string(self.target.username)
            if self.target.password is not None:
                body += _string(self.target.password)
        return _packet(CONNECT, 0, body)

    def _check_connack(self, body: bytes) -> None:
        if len(body) < 2:
            raise LinkError("malformed CONNACK")
        self.session_present = bool(body[0] & 0x01)
        if body[1] != 0:
            raise LinkError(f"the broker {self.target} refused the connection (reason code 0x{body[1]:02x})")

    def _subscribe_packet(self) -> bytes:
        body = struct.pack("!H", self._packet_id()) + (b"\x00" if self.v5 else b"")
        for topic_filter in self.subscriptions:
            body += _string(topic_filter) + b"\x01"  # QoS 1
        return _packet(SUBSCRIBE, 0x02, body)

    def _check_suback(self, body: bytes) -> None:
        offset = 2
        if self.v5:
            length, offset = self._read_varint(body, offset)
            offset += length
        codes = body[offset:]
        refused = [f"{f} (0x{c:02x})" for f, c in zip(self.subscriptions, codes, strict=False) if c >= 0x80]
        if refused or len(codes) != len(self.subscriptions):
            raise LinkError(
                f"the broker refused the subscriptions: {', '.join(refused) or 'malformed SUBACK'}"
            )

    def _expect(self, kind: int, deadline: float) -> bytes:
        """Wait for the next packet of `kind`. A resumed session's messages may come first: they are
        kept for the next `receive`."""
        while True:
            packet = self._next_packet()
            if packet is not None:
                got, flags, body = packet
                if got == kind:
                    return body
                if got == PUBLISH:
                    self._early.append(self._inbound(flags, body))
                elif got == PUBACK:
                    self._unacked.pop(struct.unpack_from("!H", body)[0], None)
                elif got != PINGRESP:
                    raise LinkError(f"expected packet type {kind}, got {got}")
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkError(f"the broker {self.target} did not answer in time")
            self._fill(left)

    # Receiving ------------------------------------------------------------------------------------

    def receive(self, timeout: float, max_bytes: int | None = None) -> list[Inbound]:
        """Every PUBLISH that has arrived, or as many as reach `max_bytes` of payload, waiting up to
        `timeout` seconds for the first. Answers keepalives and takes the broker's acks of our
        publishes on the way. Raises LinkError.

        The socket is read only when nothing is left to parse, READ_SIZE at a time: what this link
        holds stays within that and one batch, and a backlog waits in the kernel and the broker (TCP
        flow control), however large the messages the broker lets through. What is read and not yet
        parsed goes with the connection if it drops; QoS 1 messages come again."""
        messages, self._early = self._early + self._parse(max_bytes), []
        if not messages:
            self._fill(timeout)
            messages = self._parse(max_bytes)
        self.ping_if_due()
        return messages

    def _parse(self, max_bytes: int | None = None) -> list[Inbound]:
        messages: list[Inbound] = []
        size = 0
        while (max_bytes is None or size < max_bytes) and (packet := self._next_packet()) is not None:
            kind, flags, body = packet
            if kind == PUBLISH:
                messages.append(inbound := self._inbound(flags, body))
                size += len(inbound.payload)
            elif kind == PUBACK:
                self._unacked.pop(struct.unpack_from("!H", body)[0], None)
            elif kind == SUBACK:
                self._check_suback(body)
            elif kind == DISCONNECT:
                reason = body[0] if body else 0
                self.close()
                raise LinkError(f"the broker {self.target} ended the session (reason code 0x{reason:02x})")
            elif kind != PINGRESP:
                raise LinkError(f"unexpected packet type {kind}")
        return messages

    def _inbound(self, flags: int, body: bytes) -> Inbound:
        qos = (flags >> 1) & 0x03
        (length,) = struct.unpack_from("!H", body)
        offset = 2 + length
        topic = body[2:offset]
        packet_id = 0
        if qos:
            (packet_id,) = struct.unpack_from("!H", body, offset)
            offset += 2
        if self.v5:
            props, offset = self._read_varint(body, offset)
            offset += props
        return Inbound(topic, body[offset:], packet_id)

    def _next_packet(self) -> tuple[int, int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        length, multiplier, offset = 0, 1, 1
        while True:
            if offset >= len(buffer):
                return None
            byte = buffer[offset]
            length += (byte & 0x7F) * multiplier
            offset += 1
            if not byte & 0x80:
                break
            multiplier *= 128
            if offset > 4:
                raise LinkError("malformed packet length")
        end = offset + length
        if len(buffer) < end:
            return None
        header = buffer[0]
        body = bytes(buffer[offset:end])
        del buffer[:end]
        return header >> 4, header & 0x0F, body

    @staticmethod
    def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
        value, multiplier = 0, 1
        while True:
            byte = data[offset]
            offset += 1
            value += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                return value, offset
            multiplier *= 128

    def _fill(self, timeout: float) -> None:
        """Read what the socket has, waiting up to `timeout` for something."""
        sock = self._require()
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending and not select.select([sock], [], [], max(timeout, 0))[0]:
            return
        try:
            data = sock.recv(READ_SIZE)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError as exc:
            self.close()
            raise LinkError(f"lost the broker {self.target}: {exc}") from None
        if not data:
            self.close()
            raise LinkError(f"the broker {self.target} closed the connection")
        self._buffer += data

    # Sending --------------------------------------------------------------------------------------

    def ack(self, packet_ids: list[int]) -> None:
        """Acknowledge QoS 1 messages (their batch is committed), in one write."""
        ids = [i for i in packet_ids if i]
        if ids:
            self._send(b"".join(b"\x40\x02" + struct.pack("!H", i) for i in ids))

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1; kept until the broker acknowledges it, re-sent after a reconnect."""
        packet_id = self._packet_id()
        data = (topic.encode(), payload)
        self._unacked[packet_id] = data
        self._send(self._publish_packet(*data, packet_id))

    def _publish_packet(self, topic: bytes, payload: bytes, packet_id: int, *, dup: bool = False) -> bytes:
        body = _string(topic) + struct.pack("!H", packet_id) + (b"\x00" if self.v5 else b"") + payload
        return _packet(PUBLISH, 0x02 | (0x08 if dup else 0), body)

    def ping_if_due(self) -> None:
        """Send PINGREQ when nothing was sent for half the keepalive."""
        if self._sock is not None and time.monotonic() - self._last_sent > self.keepalive / 2:
            self._send(b"\xc0\x00")

    def _packet_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._unacked:
                return self._next_id
        raise LinkError("every packet id is in use")

    def _send(self, data: bytes) -> None:
        sock = self._require()
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = sock.send(view)
                except (BlockingIOError, ssl.SSLWantWriteError):
                    select.select([], [sock], [], 5.0)
                    continue
                view = view[sent:]
        except OSError as exc:
            self.close()
            raise LinkError(f"lost the broker {self.target}: {exc}") from None
        self._last_sent = time.monotonic()

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise LinkError("not connected")
        return self._sock

    def disconnect(self) -> None:
        """Say goodbye (the session stays, if persistent) and close."""
        if self._sock is not None:
            try:
                self._send(b"\xe0\x00")
            except LinkError:
                pass
        self.close()

    def close(self) -> None:
        """Drop the connection without a word (what is unacknowledged is delivered again)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
