"""The embedded broker reads each client's CONNECT itself before amqtt sees it (broker/embedded.py,
`EmbeddedBroker._accept`): what it parses, what it refuses, and how a client id's second connection
takes over the first. The logins themselves are in test_embedded.py."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.acl import provision_commands
from broker.client import BrokerTarget
from broker.dynsec_state import Hello
from tests.brokers import RunningBroker
from tests.embedded_broker import Peer, control
from wire.topics import MessageKind, device_topic

DEVICE = "cam-a"
SECRET = secrets.token_urlsafe(16)
CMD = device_topic(DEVICE, MessageKind.CMD)


def connect_packet(
    client_id: bytes,
    *,
    level: int = 4,
    flags: int = 0x02,
    keepalive: int = 30,
    fields: tuple[bytes, ...] = (),
) -> bytes:
    """A CONNECT packet: protocol `level`, connect `flags`, then the client id and `fields` (will topic,
    will message, username, password: whichever `flags` announce)."""
    body = b"\x00\x04MQTT" + bytes([level, flags]) + keepalive.to_bytes(2, "big")
    body += b"".join(len(f).to_bytes(2, "big") + f for f in (client_id, *fields))
    assert len(body) < 128  # a one-byte remaining length
    return bytes([0x10, len(body)]) + body


def send(target: BrokerTarget, packet: bytes) -> bytes:
    """Send `packet` on a new connection; what the broker answered before it closed (or 4 bytes)."""
    with socket.create_connection((target.host, target.port), timeout=5) as connection:
        connection.sendall(packet)
        return connection.recv(4)


@pytest.fixture
def device(embedded_broker: RunningBroker) -> BrokerTarget:
    control(embedded_broker.admin, provision_commands(DEVICE, SECRET))
    return embedded_broker.as_device(DEVICE, SECRET)


def test_hello_reads_what_the_login_needs() -> None:
    # Prepare
    sent = b"pass\xff"  # a password need not be UTF-8
    fields = (b"diredi/v1/dev/cam-a/presence", b"offline", b"cam-a", sent)
    packet = connect_packet(b"cam-a", flags=0x80 | 0x40 | 0x20 | 0x08 | 0x04, keepalive=60, fields=fields)

    # Execute
    hello = Hello.parse(packet)

    # Assert
    assert hello == Hello(
        level=4,
        client_id="cam-a",
        clean_session=False,
        keepalive=60,
        will_topic="diredi/v1/dev/cam-a/presence",
        will_retain=True,
        username="cam-a",
        password=sent.decode(errors="surrogateescape"),  # the hash encodes it back to the bytes sent
    )


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\xc0\x00",  # PINGREQ
        connect_packet(b"cam-a")[:-1],  # cut short
        connect_packet(b"cam-a", flags=0x03),  # the reserved flag
        connect_packet(b"\xff\xfe"),  # a client id that is not UTF-8
        connect_packet(b"cam-a", flags=0x82),  # a username announced, none sent
        connect_packet(b"cam-a").replace(b"MQTT", b"MQTX"),
    ],
)
def test_hello_refuses_what_is_not_a_valid_connect(packet: bytes) -> None:
    with pytest.raises(ValueError):
        Hello.parse(packet)


@given(st.binary(max_size=64))
def test_hello_never_fails_otherwise(tail: bytes) -> None:
    for packet in (tail, b"\x10" + tail, connect_packet(b"x")[:12] + tail):
        try:
            Hello.parse(packet)
        except ValueError:
            pass


def test_another_mqtt_version_gets_connack_1(embedded_broker: RunningBroker) -> None:
    # Execute
    answer = send(embedded_broker.target, connect_packet(b"cam-a", level=5))

    # Assert
    assert answer == b"\x20\x02\x00\x01"  # unacceptable protocol version


@pytest.mark.parametrize("packet", [b"\xc0\x00", b"GET / HTTP/1.1\r\n\r\n", b"\x10\xff\xff\xff\xff\x01"])
def test_a_connection_that_does_not_start_with_connect_is_closed(
    embedded_broker: RunningBroker, packet: bytes
) -> None:
    assert send(embedded_broker.target, packet) == b""


@pytest.mark.parametrize("persistent", [False, True])
def test_a_second_connection_of_a_client_id_ends_the_first(
    embedded_broker: RunningBroker, device: BrokerTarget, peers: Callable[..., Peer], persistent: bool
) -> None:
    # Prepare
    first = peers(device, DEVICE, persistent=persistent)
    assert not first.connect().is_failure
    assert not first.subscribe(CMD).is_failure
    cloud = peers(embedded_broker.cloud, f"cloud-{secrets.token_hex(4)}")
    assert not cloud.connect().is_failure

    # Execute
    second = peers(device, DEVICE, persistent=persistent)
    assert not second.connect().is_failure
    if not persistent:
        assert not second.subscribe(CMD).is_failure  # a clean session starts without subscriptions
    cloud.publish(CMD, b"to the second")

    # Assert
    assert first.disconnected.wait(5)
    assert second.next_message().payload == b"to the second"
    assert first.messages.empty()


def test_a_persistent_session_keeps_what_came_while_it_was_away(
    embedded_broker: RunningBroker, device: BrokerTarget, peers: Callable[..., Peer]
) -> None:
    # Prepare
    away = peers(device, DEVICE, persistent=True)
    assert not away.connect().is_failure
    assert not away.subscribe(CMD).is_failure
    away.close()
    cloud = peers(embedded_broker.cloud, f"cloud-{secrets.token_hex(4)}")
    assert not cloud.connect().is_failure

    # Execute
    cloud.publish(CMD, b"while away", qos=1)
    back = peers(device, DEVICE, persistent=True)
    assert not back.connect().is_failure

    # Assert
    assert back.next_message().payload == b"while away"


@pytest.mark.parametrize("topic", [b"diredi/v1/dev/cam-a/+", b"diredi/v1/#", b""])
def test_a_publish_to_a_wildcard_or_empty_topic_ends_the_connection_and_sends_the_will(
    embedded_broker: RunningBroker, device: BrokerTarget, peers: Callable[..., Peer], topic: bytes
) -> None:
    # Prepare
    presence = device_topic(DEVICE, MessageKind.PRESENCE)
    cloud = peers(embedded_broker.cloud, f"cloud-{secrets.token_hex(4)}")
    assert not cloud.connect().is_failure and not cloud.subscribe(presence).is_failure
    fields = (presence.encode(), b"offline", DEVICE.encode(), SECRET.encode())
    login = connect_packet(DEVICE.encode(), flags=0xC6, fields=fields)  # username, password, will
    publish = bytes([0x30, 2 + len(topic) + 2]) + len(topic).to_bytes(2, "big") + topic + b"{}"

    with socket.create_connection((device.host, device.port), timeout=5) as client:
        client.sendall(login)
        assert client.recv(4) == b"\x20\x02\x00\x00"

        # Execute
        client.sendall(publish)

        # Assert
        assert client.recv(1) == b""  # closed by the broker
    assert cloud.next_message().payload == b"offline"
