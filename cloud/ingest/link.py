"""The ingest's MQTT connection: a lean subscriber for one purpose, many QoS 1 messages in, few out.

Why not paho (which the devices and the other cloud parts use, through broker/connection.py): paho
reads a packet in several system calls, so even on its external-loop API, on the caller's thread with
manual acknowledgement, it receives at 0.4x the rate of this link (`python -m bench.ingest_link`,
docs/mqtt.md). This link reads what the socket has in one call, parses every complete packet in the
buffer, and acknowledges a whole batch in one write; it runs on the caller's thread. It speaks MQTT 5
(mosquitto) and 3.1.1 (the embedded broker), over TCP or TLS, and implements what the ingest needs
and nothing more: CONNECT with a persistent session, SUBSCRIBE at QoS 1, PUBLISH in at QoS 0/1 with
manual PUBACK, PUBLISH out at QoS 1 (receipts) with re-sending after a reconnect, keepalive,
DISCONNECT. Of the broker's CONNACK properties it obeys Server Keep Alive, Receive Maximum (receipts
beyond it wait for acknowledgements) and Maximum Packet Size; a reason string goes into the error.
Every wait has a deadline. tests/cloud/ingest/test_link.py plays the broker's side byte by byte.
"""

import select
import socket
import ssl
import struct
import time
from collections import deque
from typing import NamedTuple

from broker.client import BrokerTarget
from cloud.exceptions import LinkError
from cloud.ingest.packets import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    MAX_PACKET,
    MAXIMUM_PACKET_SIZE,
    PINGRESP,
    PUBACK,
    PUBLISH,
    RECEIVE_MAXIMUM,
    SERVER_KEEP_ALIVE,
    SUBACK,
    SUBSCRIBE,
    int_property,
    packet,
    properties_at,
    reason_of,
    string,
    varint,
    varint_at,
)

READ_SIZE = 1 << 18
SESSION_EXPIRY = 86_400  # seconds the broker keeps an MQTT 5 session of a disconnected ingest
SEND_TIMEOUT = 10.0  # seconds a write may wait for the broker to take data before the link gives up


class Inbound(NamedTuple):  # a tuple: made for every message, in half a frozen dataclass's time
    """One PUBLISH from the broker."""

    topic: bytes  # as sent; the wire contract decodes it
    payload: bytes
    packet_id: int  # 0 for QoS 0 (nothing to acknowledge)


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
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.target = target
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.persistent = persistent
        self.receive_maximum = receive_maximum
        self.requested_keepalive = keepalive  # what CONNECT asks for
        self.keepalive = keepalive  # what applies: the broker's Server Keep Alive when it sends one
        self.send_timeout = send_timeout
        self.v5 = target.protocol == "5"
        self.session_present = False
        self.epoch = 0  # counts successful connections: packet ids mean something only within one
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._early: list[Inbound] = []  # messages that came before the SUBACK
        self._last_sent = 0.0
        self._next_id = 0
        self._unacked: dict[int, tuple[bytes, bytes]] = {}  # our QoS 1 publishes: id → (topic, payload)
        self._waiting: deque[tuple[bytes, bytes]] = deque()  # publishes beyond the broker's window
        self.broker_receive_maximum = 65_535  # our QoS 1 publishes the broker takes unacknowledged
        self.broker_max_packet = MAX_PACKET  # the largest packet the broker accepts (MQTT's limit)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def unacked(self) -> int:
        """Our publishes the broker has not acknowledged yet (sent, or waiting for room to be sent)."""
        return len(self._unacked) + len(self._waiting)

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
            # Re-sent within the broker's window (it may have shrunk); the rest wait their turn, in order.
            held_back = list(self._unacked)[self.broker_receive_maximum :]
            self._waiting.extendleft(reversed([self._unacked.pop(packet_id) for packet_id in held_back]))
            for packet_id, (topic, payload) in self._unacked.items():
                self._send(self._publish_packet(topic, payload, packet_id, dup=True))
            self._send_waiting()
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
        body = (
            string("MQTT") + bytes([5 if self.v5 else 4, flags]) + struct.pack("!H", self.requested_keepalive)
        )
        if self.v5:
            props = b"\x21" + struct.pack("!H", self.receive_maximum)
            if self.persistent:
                props = b"\x11" + struct.pack("!I", SESSION_EXPIRY) + props
            body += varint(len(props)) + props
        body += string(self.client_id)
        if self.target.username is not None:
            body += string(self.target.username)
            if self.target.password is not None:
                body += string(self.target.password)
        return packet(CONNECT, 0, body)

    def _check_connack(self, body: bytes) -> None:
        if len(body) < 2:
            raise LinkError("malformed CONNACK")
        properties = properties_at(body, 2)[0] if self.v5 and len(body) > 2 else {}
        if body[1] != 0:
            raise LinkError(
                f"the broker {self.target} refused the connection "
                f"(reason code 0x{body[1]:02x}){reason_of(properties)}"
            )
        self.session_present = bool(body[0] & 0x01)
        self.keepalive = int_property(properties, SERVER_KEEP_ALIVE, self.requested_keepalive)
        self.broker_receive_maximum = int_property(properties, RECEIVE_MAXIMUM, 65_535)
        self.broker_max_packet = int_property(properties, MAXIMUM_PACKET_SIZE, MAX_PACKET)
        if self.broker_receive_maximum == 0:
            raise LinkError(f"the broker {self.target} sent a Receive Maximum of 0 (a protocol error)")

    def _subscribe_packet(self) -> bytes:
        body = struct.pack("!H", self._packet_id()) + (b"\x00" if self.v5 else b"")
        for topic_filter in self.subscriptions:
            body += string(topic_filter) + b"\x01"  # QoS 1
        return packet(SUBSCRIBE, 0x02, body)

    def _check_suback(self, body: bytes) -> None:
        properties, offset = properties_at(body, 2) if self.v5 else ({}, 2)
        codes = body[offset:]
        refused = [f"{f} (0x{c:02x})" for f, c in zip(self.subscriptions, codes, strict=False) if c >= 0x80]
        if refused or len(codes) != len(self.subscriptions):
            raise LinkError(
                "the broker refused the subscriptions: "
                f"{', '.join(refused) or 'malformed SUBACK'}{reason_of(properties)}"
            )

    def _expect(self, kind: int, deadline: float) -> bytes:
        """Wait for the next packet of `kind`. A resumed session's messages may come first: they are
        kept for the next `receive`."""
        while True:
            framed = self._next_packet()
            if framed is not None:
                got, flags, body = framed
                if got == kind:
                    return body
                if got == PUBLISH:
                    self._early.append(self._inbound(flags, body))
                elif got == PUBACK:
                    self._acked(body)
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
        parsed goes with the connection if it drops; QoS 1 messages come again. A malformed packet
        ends the connection (what follows it cannot be framed)."""
        try:
            messages, self._early = self._early + self._parse(max_bytes), []
            if not messages:
                self._fill(timeout)
                messages = self._parse(max_bytes)
            self.ping_if_due()
        except LinkError:
            self.close()
            raise
        return messages

    def _parse(self, max_bytes: int | None = None) -> list[Inbound]:
        messages: list[Inbound] = []
        size = 0
        while (max_bytes is None or size < max_bytes) and (framed := self._next_packet()) is not None:
            kind, flags, body = framed
            if kind == PUBLISH:
                messages.append(inbound := self._inbound(flags, body))
                size += len(inbound.payload)
            elif kind == PUBACK:
                self._acked(body)
            elif kind == SUBACK:
                self._check_suback(body)
            elif kind == DISCONNECT:
                reason = body[0] if body else 0
                properties = properties_at(body, 1)[0] if self.v5 and len(body) > 1 else {}
                self.close()
                raise LinkError(
                    f"the broker {self.target} ended the session "
                    f"(reason code 0x{reason:02x}){reason_of(properties)}"
                )
            elif kind != PINGRESP:
                raise LinkError(f"unexpected packet type {kind}")
        return messages

    def _inbound(self, flags: int, body: bytes) -> Inbound:
        try:
            (length,) = struct.unpack_from("!H", body)
            offset = 2 + length
            topic = body[2:offset]
            packet_id = 0
            if (flags >> 1) & 0x03:  # QoS 1 or 2: a packet id follows the topic
                (packet_id,) = struct.unpack_from("!H", body, offset)
                offset += 2
            if self.v5:
                if body[offset] < 0x80:  # (a property length under 128: one byte)
                    offset += 1 + body[offset]
                else:
                    props, offset = varint_at(body, offset)
                    offset += props
        except (struct.error, IndexError):
            raise LinkError("malformed PUBLISH") from None
        if offset > len(body):
            raise LinkError("malformed PUBLISH (its properties run past its end)")
        return Inbound(topic, body[offset:], packet_id)

    def _next_packet(self) -> tuple[int, int, bytes] | None:
        buffer = self._buffer
        size = len(buffer)
        if size < 2:
            return None
        if buffer[1] < 0x80:  # the common lengths inline: one byte up to 127, two up to 16,383
            length, offset = buffer[1], 2
        elif size > 2 and buffer[2] < 0x80:
            length, offset = (buffer[1] & 0x7F) | buffer[2] << 7, 3
        else:
            try:
                length, offset = varint_at(buffer, 1)
            except IndexError:
                return None  # the length's bytes are not all here yet
        end = offset + length
        if size < end:
            return None
        header = buffer[0]
        body = bytes(buffer[offset:end])
        del buffer[:end]
        return header >> 4, header & 0x0F, body

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
        """Publish at QoS 1; kept until the broker acknowledges it, re-sent after a reconnect. Beyond
        the broker's Receive Maximum it waits for an acknowledgement to make room. LinkError when the
        packet is larger than the broker accepts."""
        data = (topic.encode(), payload)
        size = len(self._publish_packet(*data, 1))
        if size > self.broker_max_packet:
            raise LinkError(
                f"a publish of {size} bytes exceeds the broker's maximum of {self.broker_max_packet}"
            )
        self._waiting.append(data)
        self._send_waiting()

    def _send_waiting(self) -> None:
        while self._waiting and len(self._unacked) < self.broker_receive_maximum:
            packet_id = self._packet_id()
            self._unacked[packet_id] = data = self._waiting.popleft()
            self._send(self._publish_packet(*data, packet_id))

    def _acked(self, body: bytes) -> None:
        if len(body) < 2:
            raise LinkError("malformed PUBACK")
        self._unacked.pop(struct.unpack_from("!H", body)[0], None)
        if self._waiting and self._sock is not None:
            self._send_waiting()

    def _publish_packet(self, topic: bytes, payload: bytes, packet_id: int, *, dup: bool = False) -> bytes:
        body = string(topic) + struct.pack("!H", packet_id) + (b"\x00" if self.v5 else b"") + payload
        return packet(PUBLISH, 0x02 | (0x08 if dup else 0), body)

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
        """Write all of `data`, waiting at most `send_timeout` while the broker takes none of it."""
        sock = self._require()
        view = memoryview(data)
        deadline = time.monotonic() + self.send_timeout
        try:
            while view:
                try:
                    sent = sock.send(view)
                except (BlockingIOError, ssl.SSLWantWriteError):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.close()
                        raise LinkError(
                            f"the broker {self.target} took nothing for {self.send_timeout:g} s"
                        ) from None
                    select.select([], [sock], [], left)
                    continue
                view = view[sent:]
                deadline = time.monotonic() + self.send_timeout
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
