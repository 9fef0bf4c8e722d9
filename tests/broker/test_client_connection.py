"""`BrokerConnection` on both brokers (the embedded one speaks MQTT 3.1.1, mosquitto MQTT 5): connect,
checked publish and subscribe, the will, teardown and the reconnect policy; and the deadlines kept
when the broker is closed, silent or gone."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from broker.client import BrokerTarget, ClientOptions, ReconnectPolicy, Will
from broker.connection import BrokerConnection
from broker.exceptions import BrokerConnectError, BrokerPublishError, BrokerSubscribeError
from cloud.children import free_ports
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.polling import wait_until
from wire.topics import MessageKind, device_topic

NOT_AUTHORIZED = 0x87
SLACK = 1.5  # seconds a loaded machine may add to a deadline


@pytest.fixture(params=["embedded_broker", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> RunningBroker:
    running: RunningBroker = request.getfixturevalue(request.param)
    return running


def device(broker: RunningBroker) -> tuple[str, BrokerTarget]:
    """A newly provisioned device and the broker as its account."""
    device_id = new_device_id("conn")
    return device_id, broker.as_device(device_id, provisioned_device(broker, device_id))


def watcher(broker: RunningBroker, topic: str) -> Probe:
    """The cloud's account, subscribed to `topic`."""
    probe = Probe(broker.cloud, f"diredi-watch-{secrets.token_hex(4)}")
    assert probe.connect() is not None
    assert not probe.subscribe(topic).is_failure
    return probe


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that takes TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture
def deaf_broker() -> Iterator[BrokerTarget]:
    """An MQTT 3.1.1 "broker" that accepts the connection and then ignores everything it is sent."""
    listener = socket.create_server(("127.0.0.1", 0))
    peers: list[socket.socket] = []

    def serve() -> None:
        try:
            peer, _ = listener.accept()
        except OSError:
            return  # closed unused
        peers.append(peer)
        try:
            peer.recv(1024)  # the CONNECT
            peer.sendall(b"\x20\x02\x00\x00")  # CONNACK: accepted
            while peer.recv(65_536):
                pass
        except OSError:
            return  # the fixture closed it under us

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield BrokerTarget("127.0.0.1", listener.getsockname()[1], protocol="3.1.1")
    listener.close()
    for peer in peers:
        with contextlib.suppress(OSError):
            peer.shutdown(socket.SHUT_RDWR)  # ends the thread's recv before the socket goes
    thread.join(5)
    for peer in peers:
        peer.close()


# --- connecting ------------------------------------------------------------------------------------


def test_a_connection_is_up_once_the_broker_answered(broker: RunningBroker) -> None:
    # Execute
    with BrokerConnection(broker.cloud, ClientOptions(f"diredi-test-{secrets.token_hex(4)}")) as connection:
        up = connection.connected

    # Assert
    assert up and not connection.connected


def test_a_wrong_password_is_a_connect_error_naming_the_broker_and_its_reason(broker: RunningBroker) -> None:
    # Prepare
    password = secrets.token_urlsafe(16)
    wrong = broker.cloud.with_credentials(str(broker.cloud.username), password)
    connection = BrokerConnection(wrong, ClientOptions(f"diredi-test-{secrets.token_hex(4)}"), timeout=5)

    # Execute
    with pytest.raises(BrokerConnectError) as raised:
        connection.connect()

    # Assert
    error = raised.value
    assert error.reason is not None and error.reason.is_failure
    assert str(error).startswith(f"cannot connect to {wrong}: the broker refused the login (")
    assert password not in str(error) and not connection.connected


def test_a_closed_port_is_a_connect_error_within_the_deadline() -> None:
    # Prepare
    nowhere = BrokerTarget("127.0.0.1", free_ports(1)[0])
    started = time.monotonic()

    # Execute
    with pytest.raises(BrokerConnectError, match="not reachable") as raised:
        BrokerConnection(nowhere, ClientOptions("diredi-test-closed"), timeout=3).connect()

    # Assert
    assert time.monotonic() - started < 3
    assert raised.value.reason is None and str(nowhere) in str(raised.value)


def test_a_broker_that_never_answers_is_a_connect_error_at_the_deadline(silent_port: int) -> None:
    # Prepare
    silent = BrokerTarget("127.0.0.1", silent_port)
    started = time.monotonic()

    # Execute
    with pytest.raises(BrokerConnectError, match="no answer within 0.5 s"):
        BrokerConnection(silent, ClientOptions("diredi-test-silent")).connect(timeout=0.5)

    # Assert
    assert 0.5 <= time.monotonic() - started < 0.5 + SLACK


def test_tls_connects_with_the_targets_ca_and_an_untrusted_certificate_is_a_clear_error(
    mosquitto: RunningBroker,
) -> None:
    # Prepare
    assert mosquitto.tls is not None and mosquitto.cloud.username and mosquitto.cloud.password
    trusted = mosquitto.tls.with_credentials(mosquitto.cloud.username, mosquitto.cloud.password)
    untrusted = BrokerTarget(trusted.host, trusted.port, trusted.username, trusted.password, tls=True)

    # Execute
    with BrokerConnection(trusted, ClientOptions(f"diredi-test-{secrets.token_hex(4)}")) as connection:
        up = connection.connected
    with pytest.raises(BrokerConnectError, match="not reachable.*CERTIFICATE_VERIFY_FAILED"):
        BrokerConnection(untrusted, ClientOptions("diredi-test-untrusted"), timeout=5).connect()

    # Assert
    assert up


def test_a_persistent_session_is_resumed(broker: RunningBroker) -> None:
    # Prepare
    options = ClientOptions(f"diredi-test-{secrets.token_hex(4)}", persistent=True)
    with BrokerConnection(broker.cloud, options) as first:
        first.subscribe(device_topic(new_device_id(), MessageKind.STATUS))

    # Execute
    with BrokerConnection(broker.cloud, options) as second:
        resumed = second.session_present
    with BrokerConnection(broker.cloud, ClientOptions(options.client_id)) as clean:  # ends it
        fresh = clean.session_present

    # Assert
    assert (first.session_present, resumed, fresh) == (False, True, False)


# --- checked publish and subscribe -----------------------------------------------------------------


def test_a_checked_publish_returns_once_the_broker_acknowledged_it(broker: RunningBroker) -> None:
    # Prepare
    device_id, as_device = device(broker)
    topic = device_topic(device_id, MessageKind.STATUS)

    # Execute
    with (
        watcher(broker, topic) as watching,
        BrokerConnection(as_device, ClientOptions(device_id)) as connection,
    ):
        reason = connection.publish(topic, b'{"up": true}', qos=1)
        message = watching.expect_message(10)

    # Assert
    assert not reason.is_failure
    assert message is not None and message.payload == b'{"up": true}'


def test_a_publish_the_broker_refuses_is_an_error_with_its_reason(mosquitto: RunningBroker) -> None:
    # Prepare: MQTT 5 answers a forbidden publish with a PUBACK that says so (3.1.1 cannot)
    device_id, as_device = device(mosquitto)
    other = device_topic(new_device_id(), MessageKind.STATUS)

    # Execute
    with BrokerConnection(as_device, ClientOptions(device_id)) as connection:
        with pytest.raises(BrokerPublishError, match="refused the message") as raised:
            connection.publish(other, b"{}")
        still_up = connection.connected

    # Assert
    assert raised.value.reason is not None and raised.value.reason.value == NOT_AUTHORIZED
    assert still_up


def test_a_refused_subscription_is_an_error_with_the_reasons(broker: RunningBroker) -> None:
    # Prepare
    device_id, as_device = device(broker)
    own, foreign = device_topic(device_id, MessageKind.CMD), device_topic(new_device_id(), MessageKind.CMD)

    # Execute
    with BrokerConnection(as_device, ClientOptions(device_id)) as connection:
        granted = connection.subscribe(own)
        with pytest.raises(BrokerSubscribeError, match="refused") as raised:
            connection.subscribe([own, foreign])

    # Assert
    assert [r.is_failure for r in granted] == [False]
    assert [r.is_failure for r in raised.value.reasons] == [False, True]


def test_a_publish_nobody_acknowledges_is_an_error_at_the_deadline(deaf_broker: BrokerTarget) -> None:
    # Prepare
    with BrokerConnection(deaf_broker, ClientOptions("diredi-test-deaf")) as connection:
        started = time.monotonic()

        # Execute
        with pytest.raises(BrokerPublishError, match="did not acknowledge the message for a/b within 0.5 s"):
            connection.publish("a/b", b"x", timeout=0.5)

        # Assert
        assert 0.5 <= time.monotonic() - started < 0.5 + SLACK


def test_a_checked_publish_is_an_error_within_the_deadline_when_the_broker_is_gone(
    broker: RunningBroker,
) -> None:
    # Prepare
    device_id, as_device = device(broker)
    drops: list[object] = []
    connection = BrokerConnection(as_device, ClientOptions(device_id), timeout=5)
    connection.on_disconnect = drops.append
    connection.connect()

    # Execute
    broker.kill()
    try:
        started = time.monotonic()
        with pytest.raises(BrokerPublishError, match="not (currently )?connected|dropped"):
            for _ in range(100):  # until paho has seen the connection end
                connection.publish(device_topic(device_id, MessageKind.STATUS), b"{}", timeout=3)
                time.sleep(0.05)
        elapsed = time.monotonic() - started
        # paho marks the link down before its network thread calls on_disconnect: wait for that call
        wait_until(lambda: drops, 10, "on_disconnect was not called")
    finally:
        connection.close()
        broker.start()

    # Assert
    assert elapsed < 3 + SLACK
    assert len(drops) == 1


# --- the will, teardown, reconnecting ----------------------------------------------------------------


def test_the_will_is_published_when_the_connection_ends_abruptly_and_not_after_a_close(
    broker: RunningBroker,
) -> None:
    # Prepare
    device_id, as_device = device(broker)
    presence = device_topic(device_id, MessageKind.PRESENCE)
    options = ClientOptions(device_id, will=Will(presence, b'{"state": "offline"}', qos=1, retain=False))

    with watcher(broker, presence) as watching:
        # Execute: a clean close, then a crash (the socket shut without a DISCONNECT)
        with BrokerConnection(as_device, options):
            pass
        after_close = watching.expect_message(0.5)
        crashing = BrokerConnection(as_device, options)
        crashing.connect()
        sock = crashing.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        will = watching.expect_message(10)
        crashing.close()

    # Assert
    assert after_close is None
    assert will is not None and (will.topic, will.payload) == (presence, b'{"state": "offline"}')


def test_the_reconnect_policy_brings_a_connection_back_and_without_one_it_stays_down(
    mosquitto: RunningBroker,
) -> None:
    # Prepare
    cloud = mosquitto.cloud
    policy = ReconnectPolicy(first_delay=1, max_delay=2)
    coming_back = BrokerConnection(
        cloud, ClientOptions(f"diredi-test-{secrets.token_hex(4)}", reconnect=policy)
    )
    staying_down = BrokerConnection(cloud, ClientOptions(f"diredi-test-{secrets.token_hex(4)}"))
    coming_back.connect()
    staying_down.connect()

    # Execute
    mosquitto.kill()
    try:
        wait_until(lambda: not coming_back.connected, 10, "the drop was never noticed")
    finally:
        mosquitto.start()
    try:
        wait_until(lambda: coming_back.connected, 30, "the connection did not come back")
        reason = coming_back.publish(device_topic(new_device_id(), MessageKind.CMD), b"{}")
        down = not staying_down.connected
    finally:
        coming_back.close()
        staying_down.close()

    # Assert
    assert not reason.is_failure and down
