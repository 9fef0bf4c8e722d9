"""The ingest's MQTT link against a scripted broker on a loopback socket, byte by byte (MQTT 5 and 3.1.1)."""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from broker.client import BrokerTarget
from cloud.exceptions import LinkError
from cloud.ingest.link import Inbound, IngestLink
from cloud.ingest.packets import CONNACK, PUBLISH, SUBACK, packet, string, varint, varint_at

T = TypeVar("T")
WAIT = 5.0  # seconds a step of the script may take before the test fails (never reached when it works)
PINGREQ_BYTES, PINGRESP_BYTES = b"\xc0\x00", b"\xd0\x00"


class Peer:
    """The broker's end of one accepted connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, size: int, timeout: float = WAIT) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self._buffer) < size:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise AssertionError(f"the link closed the connection; got {bytes(self._buffer)!r}")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def recv_packet(self) -> tuple[int, bytes]:
        """The next packet from the link: its first byte (type and flags) and its body."""
        header = self.recv_exactly(1)[0]
        raw = b""
        while not raw or raw[-1] & 0x80:
            raw += self.recv_exactly(1)
        length, _ = varint_at(raw, 0)
        return header, self.recv_exactly(length)

    def assert_silent(self, within: float = 0.1) -> None:
        """Nothing more comes from the link (what it sends is on loopback at once)."""
        readable = select.select([self.sock], [], [], within)[0]
        extra = bytes(self._buffer) + (self.sock.recv(1 << 16, socket.MSG_PEEK) if readable else b"")
        assert extra == b"", f"the link sent {extra!r}"

    def close(self, *, reset: bool = False) -> None:
        if reset:  # linger 0: the close sends RST
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class FakeBroker:
    """A listening socket the test plays the broker on; the link's blocking calls run `meanwhile`."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # accepted sockets inherit it
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port: int = self.listener.getsockname()[1]
        self.peers: list[Peer] = []
        self._pool = ThreadPoolExecutor(max_workers=2)

    def target(self, protocol: str = "5") -> BrokerTarget:
        return BrokerTarget(host="127.0.0.1", port=self.port, protocol=protocol)

    def accept(self) -> Peer:
        self.listener.settimeout(WAIT)
        sock, _ = self.listener.accept()
        self.peers.append(peer := Peer(sock))
        return peer

    def meanwhile(self, call: Callable[..., T], *args: Any) -> Future[T]:
        return self._pool.submit(call, *args)

    def close(self) -> None:
        for peer in self.peers:
            peer.sock.close()
        self.listener.close()
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    fake = FakeBroker()
    yield fake
    fake.close()


# What the broker sends -----------------------------------------------------------------------------
def connack(*, v5: bool = True, session_present: bool = False, code: int = 0, props: bytes = b"") -> bytes:
    body = bytes([int(session_present), code]) + (varint(len(props)) + props if v5 else b"")
    return packet(CONNACK, 0, body)


def suback(packet_id: int, codes: bytes, *, v5: bool = True) -> bytes:
    return packet(SUBACK, 0, struct.pack("!H", packet_id) + (b"\x00" if v5 else b"") + codes)


def publish(
    topic: bytes, payload: bytes, packet_id: int = 0, *, v5: bool = True, props: bytes = b""
) -> bytes:
    """A PUBLISH at QoS 1 when it has a packet id, else at QoS 0."""
    body = string(topic) + (struct.pack("!H", packet_id) if packet_id else b"")
    body += (varint(len(props)) + props if v5 else b"") + payload
    return packet(PUBLISH, 0x02 if packet_id else 0x00, body)


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


def published(body: bytes, *, v5: bool = True) -> tuple[bytes, int, bytes]:
    """Topic, packet id and payload of a QoS 1 PUBLISH the link sent."""
    (size,) = struct.unpack_from("!H", body)
    topic, (packet_id,) = body[2 : 2 + size], struct.unpack_from("!H", body, 2 + size)
    assert not v5 or body[4 + size] == 0, "the link's publishes carry no properties"
    return topic, packet_id, body[4 + size + v5 :]


@dataclass(frozen=True)
class Session:
    peer: Peer
    connect: bytes  # the body of the link's CONNECT
    subscribe: bytes  # the body of its SUBSCRIBE


def handshake(
    broker: FakeBroker,
    link: IngestLink,
    *,
    props: bytes = b"",
    session_present: bool = False,
    before_suback: bytes = b"",
) -> Session:
    """Connect `link`: read its CONNECT, answer, read its SUBSCRIBE, grant it (unless the session is
    resumed); `before_suback` goes out just ahead of the SUBACK."""
    done = broker.meanwhile(link.connect, WAIT)
    peer = broker.accept()
    header, connect = peer.recv_packet()
    assert header == 0x10
    peer.send(connack(v5=link.v5, session_present=session_present, props=props))
    header, subscribe = peer.recv_packet()
    assert header == 0x82
    if not session_present:
        (packet_id,) = struct.unpack_from("!H", subscribe)
        peer.send(before_suback + suback(packet_id, b"\x01" * len(link.subscriptions), v5=link.v5))
    done.result(WAIT)
    return Session(peer, connect, subscribe)


def new_link(broker: FakeBroker, protocol: str = "5", **options: Any) -> IngestLink:
    return IngestLink(broker.target(protocol), "ingest-1", ["devices/+/report"], **options)


def collect(link: IngestLink, count: int) -> list[Inbound]:
    """Receive until `count` messages have come (failing after WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    messages: list[Inbound] = []
    while len(messages) < count and time.monotonic() < deadline:
        messages += link.receive(0.05)
    return messages


def refused_connect(broker: FakeBroker, link: IngestLink, *answers: bytes) -> LinkError:
    """The error `link.connect` raises when the broker answers its packets (CONNECT, SUBSCRIBE) so."""
    done = broker.meanwhile(link.connect, WAIT)
    peer = broker.accept()
    for answer in answers:
        peer.recv_packet()
        peer.send(answer)
    with pytest.raises(LinkError) as caught:
        done.result(WAIT)
    return caught.value


# CONNECT and SUBSCRIBE -----------------------------------------------------------------------------
def test_a_v5_connect_asks_for_a_persistent_session_with_credentials(broker: FakeBroker) -> None:
    target = BrokerTarget.parse(f"mqtt://user:secret@127.0.0.1:{broker.port}")
    link = IngestLink(target, "ingest-1", ["a/#"], receive_maximum=100, keepalive=30)

    session = handshake(broker, link)

    props = b"\x11\x00\x01\x51\x80" + b"\x21\x00\x64"  # Session Expiry 86400, Receive Maximum 100
    head = b"\x00\x04MQTT" + b"\x05" + b"\xc0" + b"\x00\x1e"  # level 5; username, password, clean start 0
    assert session.connect == head + b"\x08" + props + string("ingest-1") + string("user") + string("secret")


def test_a_v5_connect_without_persistence_sets_clean_start_and_no_session_expiry(broker: FakeBroker) -> None:
    link = IngestLink(broker.target("5"), "ingest-1", ["a/#"], persistent=False, receive_maximum=100)

    session = handshake(broker, link)

    assert session.connect == b"\x00\x04MQTT\x05\x02\x00\x1e" + b"\x03\x21\x00\x64" + string("ingest-1")


def test_a_3_1_1_connect_has_level_4_and_no_properties(broker: FakeBroker) -> None:
    target = BrokerTarget.parse(f"mqtt://user@127.0.0.1:{broker.port}?protocol=3.1.1")
    link = IngestLink(target, "ingest-1", ["a/#"], keepalive=60)

    session = handshake(broker, link)

    assert session.connect == b"\x00\x04MQTT\x04\x80\x00\x3c" + string("ingest-1") + string("user")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_subscribe_asks_qos_1_for_every_filter(broker: FakeBroker, protocol: str) -> None:
    link = IngestLink(broker.target(protocol), "ingest-1", ["devices/+/report", "devices/+/ack"])

    session = handshake(broker, link)

    properties = b"\x00" if protocol == "5" else b""
    filters = string("devices/+/report") + b"\x01" + string("devices/+/ack") + b"\x01"
    assert session.subscribe == b"\x00\x01" + properties + filters


# CONNACK -------------------------------------------------------------------------------------------
def test_a_refused_connack_raises_with_the_code_and_the_reason_string(broker: FakeBroker) -> None:
    link = new_link(broker)

    error = refused_connect(broker, link, connack(code=0x87, props=b"\x1f" + string("not on my list")))

    assert "0x87" in str(error) and "not on my list" in str(error)
    assert not link.connected


def test_publishes_beyond_the_brokers_receive_maximum_wait_for_a_puback(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link, props=b"\x21\x00\x02").peer

    for n in range(3):
        link.publish("receipts/r", b"receipt %d" % n)
    first, second = published(peer.recv_packet()[1]), published(peer.recv_packet()[1])
    peer.assert_silent()
    assert link.unacked == 3
    peer.send(puback(first[1]))
    assert link.receive(WAIT) == []
    header, third = peer.recv_packet()

    assert [first[2], second[2]] == [b"receipt 0", b"receipt 1"]
    assert header == 0x32 and published(third)[2] == b"receipt 2"
    assert published(third)[1] != second[1]  # not an id still in flight
    assert link.unacked == 2


def test_a_publish_larger_than_the_brokers_maximum_packet_size_raises(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link, props=b"\x27\x00\x00\x00\x40").peer  # 64 bytes

    link.publish("t", b"x" * 10)
    with pytest.raises(LinkError, match="exceeds the broker's maximum of 64"):
        link.publish("t", b"x" * 100)

    assert published(peer.recv_packet()[1])[2] == b"x" * 10
    peer.assert_silent()
    assert link.unacked == 1 and link.connected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x00\x00\x02\x7f\x00", "unknown MQTT 5 property 0x7f"),
        (b"\x00\x00\x0a\x13\x00\x05", "malformed MQTT 5 properties"),  # the length runs past the end
        (b"\x00\x00\x02\x13\x00", "malformed MQTT 5 properties"),  # a two-byte value cut short
        (b"\x00\x00\x04\x1f\x00\x09x", "malformed MQTT 5 properties"),  # a string longer than the rest
        (b"\x00", "malformed CONNACK"),
        (b"\x00\x00\x03\x21\x00\x00", "Receive Maximum of 0"),
    ],
)
def test_a_malformed_connack_raises(broker: FakeBroker, body: bytes, message: str) -> None:
    link = new_link(broker)

    error = refused_connect(broker, link, packet(CONNACK, 0, body))

    assert message in str(error)
    assert not link.connected


def test_a_refused_subscription_raises_on_connect(broker: FakeBroker) -> None:
    link = IngestLink(broker.target(), "ingest-1", ["a/#", "b/#"])

    error = refused_connect(broker, link, connack(), suback(1, b"\x01\x87"))

    assert "b/# (0x87)" in str(error) and "a/#" not in str(error)
    assert not link.connected


# A resumed session ---------------------------------------------------------------------------------
def test_a_resumed_session_does_not_wait_for_the_suback(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link, session_present=True).peer

    peer.send(publish(b"a", b"one", 7) + publish(b"b", b"two", 8) + suback(1, b"\x01"))
    messages = collect(link, 2)

    assert link.session_present
    assert messages == [Inbound(b"a", b"one", 7), Inbound(b"b", b"two", 8)]
    assert link.receive(0.05) == []


def test_messages_before_the_suback_come_with_the_next_receive(broker: FakeBroker) -> None:
    link = new_link(broker)
    early = publish(b"a", b"one", 7) + puback(9) + PINGRESP_BYTES + publish(b"b", b"two")

    handshake(broker, link, before_suback=early)
    started = time.monotonic()
    messages = link.receive(WAIT)

    assert messages == [Inbound(b"a", b"one", 7), Inbound(b"b", b"two", 0)]
    assert time.monotonic() - started < WAIT / 2  # returned what it held, without waiting
    assert link.receive(0.05) == []


# Inbound PUBLISH -----------------------------------------------------------------------------------
def test_a_stream_sent_one_byte_at_a_time_is_received_once_in_order(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link).peer
    expected = [Inbound(b"t/1", b"first", 1), Inbound(b"t/2", b"x" * 130, 2), Inbound(b"t/3", b"third", 0)]
    stream = publish(b"t/1", b"first", 1) + puback(5) + publish(b"t/2", b"x" * 130, 2) + PINGRESP_BYTES
    stream += publish(b"t/3", b"third")  # the 130 bytes make a two-byte remaining length

    def trickle() -> None:
        for byte in stream:
            peer.send(bytes([byte]))
            time.sleep(0.0005)

    sending = broker.meanwhile(trickle)
    messages = collect(link, 3)
    sending.result(WAIT)

    assert messages == expected
    assert link.receive(0.05) == []


def test_a_stream_split_anywhere_in_its_headers_is_received_once_in_order(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link).peer
    first = publish(b"t/1", b"a" * 200, 1)  # a two-byte remaining length
    second = publish(b"t/2", b"b" * 20_000, 2)  # a three-byte one
    stream = first + second
    boundary = len(first)
    splits = [*range(1, 12), *range(boundary - 2, boundary + 12), len(stream) - 1]
    expected = [Inbound(b"t/1", b"a" * 200, 1), Inbound(b"t/2", b"b" * 20_000, 2)]

    for split in splits:
        peer.send(stream[:split])
        messages = link.receive(WAIT)  # reads the first part before the rest is sent
        peer.send(stream[split:])
        messages += collect(link, 2 - len(messages))

        assert messages == expected, f"split at {split}"
    assert link.receive(0.05) == []


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_many_packets_in_one_send_are_all_received_in_order(broker: FakeBroker, protocol: str) -> None:
    link = new_link(broker, protocol)
    peer = handshake(broker, link).peer
    link.publish("receipts/r", b"receipt")
    (_, receipt_id, _) = published(peer.recv_packet()[1], v5=link.v5)
    expected = [Inbound(b"t/%d" % n, b"payload %d" % n, n % 3 and n) for n in range(1, 51)]
    stream = b"".join(publish(m.topic, m.payload, m.packet_id, v5=link.v5) for m in expected[:20])
    stream += puback(receipt_id) + PINGRESP_BYTES
    stream += b"".join(publish(m.topic, m.payload, m.packet_id, v5=link.v5) for m in expected[20:])

    peer.send(stream)
    messages = collect(link, 50)

    assert messages == expected
    assert link.unacked == 0
    assert link.receive(0.05) == []


def test_a_v5_publish_with_properties_has_the_right_payload(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link).peer
    props = b"\x26" + string("origin") + string("device-7") + b"\x02\x00\x00\x00\x3c"  # user property, expiry

    peer.send(publish(b"t", b"\x00\x01payload", 3, props=props) + publish(b"u", b"q0", props=props))

    assert collect(link, 2) == [Inbound(b"t", b"\x00\x01payload", 3), Inbound(b"u", b"q0", 0)]


def test_max_bytes_leaves_the_rest_for_the_next_receive(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link).peer
    peer.send(b"".join(publish(b"t", bytes([n]) * 100, n + 1) for n in range(5)))

    first = link.receive(WAIT, max_bytes=250)
    rest = collect(link, 2)

    assert [m.packet_id for m in first] == [1, 2, 3]
    assert [m.packet_id for m in rest] == [4, 5]


# Errors from the broker's side ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x30\xff\xff\xff\xff\x01", id="remaining length over four bytes"),
        pytest.param(b"\x32\x04\x00\x05ab", id="topic past the end, no packet id"),
        pytest.param(b"\x32\x01\x00", id="topic length cut short"),
        pytest.param(b"\x30\x04\x00\x01a\x05", id="properties past the end"),
    ],
)
def test_a_malformed_packet_raises_and_drops_the_connection(broker: FakeBroker, data: bytes) -> None:
    # A malformed packet ends the connection (MQTT 5.0, 4.13): what follows it means nothing, and a
    # link left connected would raise the same error on every receive without reading the socket.
    link = new_link(broker)
    peer = handshake(broker, link).peer

    peer.send(data)

    with pytest.raises(LinkError, match="malformed"):
        collect(link, 1)
    assert not link.connected


def test_an_unexpected_packet_type_raises(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link).peer

    peer.send(b"\x82\x02\x00\x01")  # a SUBSCRIBE, which only clients send

    with pytest.raises(LinkError, match="unexpected packet type 8"):
        collect(link, 1)


def test_a_disconnect_from_the_broker_raises_with_its_reason_and_closes(broker: FakeBroker) -> None:
    link = new_link(broker)
    peer = handshake(broker, link).peer
    props = b"\x1f" + string("server shutting down")  # a reason string

    peer.send(publish(b"t", b"before", 4) + packet(14, 0, b"\x8b" + varint(len(props)) + props))

    with pytest.raises(LinkError, match="0x8b.*server shutting down"):
        collect(link, 2)
    assert not link.connected


@pytest.mark.parametrize("reset", [False, True])
def test_a_broker_closing_the_connection_makes_receive_raise(broker: FakeBroker, reset: bool) -> None:
    link = new_link(broker)
    peer = handshake(broker, link).peer

    peer.close(reset=reset)

    with pytest.raises(LinkError, match="closed the connection|lost the broker"):
        collect(link, 1)
    assert not link.connected


# Acknowledging -------------------------------------------------------------------------------------
def test_ack_sends_every_puback_in_one_write(broker: FakeBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    link = new_link(broker)
    peer = handshake(broker, link).peer
    writes: list[bytes] = []
    send = link._send

    def counted(data: bytes) -> None:
        writes.append(data)
        send(data)

    monkeypatch.setattr(link, "_send", counted)

    link.ack([5, 0, 6, 65_535])
    link.ack([])
    link.ack([0, 0])  # QoS 0 messages: nothing to acknowledge

    data = peer.recv_exactly(12)
    peer.assert_silent()
    assert data == puback(5) + puback(6) + puback(65_535)
    assert writes == [data]


# Reconnecting --------------------------------------------------------------------------------------
def publish_then_lose_the_broker(
    broker: FakeBroker, link: IngestLink, *, acked: int | None = None
) -> list[tuple[bytes, int, bytes]]:
    """Three receipts sent (the one at index `acked` acknowledged), then the connection drops."""
    peer = handshake(broker, link).peer
    for n in range(3):
        link.publish("receipts/r", b"receipt %d" % n)
    sent = [published(peer.recv_packet()[1]) for _ in range(3)]
    if acked is not None:
        peer.send(puback(sent[acked][1]))
        assert link.receive(0.2) == []
    peer.close()
    with pytest.raises(LinkError):
        collect(link, 1)
    return sent


def test_unacknowledged_publishes_are_resent_with_dup_after_a_reconnect(broker: FakeBroker) -> None:
    link = new_link(broker)
    sent = publish_then_lose_the_broker(broker, link, acked=1)

    again = handshake(broker, link, session_present=True)
    resent = [again.peer.recv_packet() for _ in range(2)]

    assert [header for header, _ in resent] == [0x3A, 0x3A]  # PUBLISH, QoS 1, DUP
    assert [published(body) for _, body in resent] == [sent[0], sent[2]]
    assert struct.unpack_from("!H", again.subscribe)[0] not in (sent[0][1], sent[2][1])
    again.peer.assert_silent()
    assert link.epoch == 2 and link.unacked == 2


def test_a_smaller_receive_maximum_after_a_reconnect_limits_the_resent_publishes(broker: FakeBroker) -> None:
    link = new_link(broker)
    publish_then_lose_the_broker(broker, link)

    again = handshake(broker, link, props=b"\x21\x00\x01", session_present=True)
    payloads = []
    for _ in range(3):
        _, packet_id, payload = published(again.peer.recv_packet()[1])
        again.peer.assert_silent()  # one in flight at a time, as the broker allows
        payloads.append(payload)
        again.peer.send(puback(packet_id))
        assert link.receive(0.2) == []

    assert sorted(payloads) == [b"receipt 0", b"receipt 1", b"receipt 2"]
    assert link.unacked == 0


# Deadlines and keepalive ---------------------------------------------------------------------------
def test_connect_to_a_broker_that_never_answers_gives_up_at_its_timeout(broker: FakeBroker) -> None:
    link = new_link(broker)  # the listener's backlog takes the TCP connection; nobody reads it
    started = time.monotonic()

    with pytest.raises(LinkError, match="did not answer in time"):
        link.connect(timeout=0.3)

    assert 0.25 <= time.monotonic() - started < 0.3 + 3.0
    assert not link.connected


def test_a_publish_to_a_broker_that_reads_nothing_gives_up() -> None:
    broker = FakeBroker(rcvbuf=4096)
    try:
        link = new_link(broker, send_timeout=0.3)
        handshake(broker, link)
        started = time.monotonic()

        with pytest.raises(LinkError, match=r"took nothing for 0\.3 s"):
            link.publish("receipts/r", b"x" * (16 << 20))  # over tcp_wmem's usual maximum (4 MiB)

        assert time.monotonic() - started < 5.0
        assert not link.connected
    finally:
        broker.close()


def test_receive_waits_its_timeout_and_ping_if_due_pings_after_half_the_keepalive(broker: FakeBroker) -> None:
    link = new_link(broker, keepalive=10)
    peer = handshake(broker, link).peer
    started = time.monotonic()

    assert link.receive(0.1) == []
    assert 0.09 <= time.monotonic() - started < 0.1 + 3.0
    link.ping_if_due()  # the SUBSCRIBE was just sent
    peer.assert_silent()
    link._last_sent = time.monotonic() - 6
    link.ping_if_due()

    assert peer.recv_exactly(2) == PINGREQ_BYTES
    link.ping_if_due()  # the PINGREQ counts as sent
    peer.assert_silent()


def test_server_keep_alive_replaces_the_keepalive_and_paces_the_pings(broker: FakeBroker) -> None:
    link = new_link(broker, keepalive=60)
    peer = handshake(broker, link, props=b"\x13\x00\x05").peer
    assert link.keepalive == 5
    link._last_sent = time.monotonic() - 3  # over half of 5 s (under half of the 60 s asked for)

    assert link.receive(0.0) == []
    assert peer.recv_exactly(2) == PINGREQ_BYTES
    peer.send(PINGRESP_BYTES)
    assert link.receive(0.2) == []
    assert link.connected
