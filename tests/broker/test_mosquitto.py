"""mosquitto with the production configuration enforces DESIGN §2 cell by cell: who may connect,
publish and subscribe where, over the plain and the TLS listener, within the configured limits."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from broker.acl import CONTROL_TOPIC, provision_commands, revoke_commands
from broker.dynsec import DynsecAdmin
from broker.mosquitto import ensure_service_account
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.polling import wait_until
from wire.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, MessageKind, device_filter, device_topic

NOT_AUTHORIZED = 0x87
MARKER = b"marker from the cloud"


@dataclass(frozen=True)
class Pair:
    """Two provisioned devices: the tests act as `a` and aim at `b`."""

    a: str
    a_secret: str
    b: str
    b_secret: str


@pytest.fixture(scope="module")
def pair(mosquitto: RunningBroker) -> Pair:
    a, b = new_device_id("cam-a"), new_device_id("cam-b")
    return Pair(a, provisioned_device(mosquitto, a), b, provisioned_device(mosquitto, b))


@pytest.fixture
def device_a(mosquitto: RunningBroker, pair: Pair) -> Iterator[Probe]:
    """Device `a`, connected."""
    with Probe(mosquitto.as_device(pair.a, pair.a_secret), pair.a) as probe:
        reason = probe.connect()
        assert reason is not None and not reason.is_failure
        yield probe


@pytest.fixture
def watcher(mosquitto: RunningBroker) -> Iterator[Probe]:
    """The cloud's service account, connected: it sees whatever reaches a topic."""
    with Probe(mosquitto.cloud, new_device_id("watcher")) as probe:
        reason = probe.connect()
        assert reason is not None and not reason.is_failure
        yield probe


def is_delivered_only_marker(watcher: Probe, topic: str) -> bool:
    """Publish the marker as the cloud: it arrives after anything the broker routed before it."""
    watcher.publish(topic, MARKER)
    first = watcher.expect_message()
    return first is not None and first.payload == MARKER and watcher.expect_message(0.1) is None


Topic = Callable[[Pair], str]


def topic_of(device: str, kind: MessageKind) -> Topic:
    """The topic of `kind` for device `a` or `b` of the pair."""
    return lambda pair: device_topic(pair.a if device == "a" else pair.b, kind)


def collect(probes: tuple[Probe, ...], count: int, timeout: float = 30.0) -> list[list[bytes]]:
    """The payloads each probe received: once `count` messages arrived between them (however long a
    loaded broker pauses), and then any more that come within 0.3 s."""
    received: list[list[bytes]] = [[] for _ in probes]

    def take(wait: float) -> int:
        for probe, payloads in zip(probes, received, strict=True):
            while (message := probe.expect_message(wait)) is not None:
                payloads.append(bytes(message.payload))
        return sum(len(payloads) for payloads in received)

    wait_until(lambda: take(0) >= count, timeout, lambda: f"{take(0)} messages of {count}: {received}")
    take(0.3)
    return received


# Where device `a` may not publish: the other device's topics, both directions; its own cloud→device
# topics (no forged commands, receipts or desired models); anything else under the prefix.
FORBIDDEN_PUBLISH: dict[str, Topic] = {
    **{f"b's {kind}": topic_of("b", kind) for kind in MessageKind},
    **{f"own {kind}": topic_of("a", kind) for kind in DEVICE_SUBSCRIBES},
    "an unknown suffix": lambda p: device_topic(p.a, MessageKind.STATUS) + "/extra",
    "outside the device prefix": lambda p: "diredi/v1/broadcast",
}


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("topic", FORBIDDEN_PUBLISH.values(), ids=FORBIDDEN_PUBLISH.keys())
def test_a_device_cannot_publish_where_it_does_not_own_the_topic(
    pair: Pair, device_a: Probe, watcher: Probe, topic: Topic, qos: int
) -> None:
    # Prepare
    target = topic(pair)
    assert not watcher.subscribe(target).is_failure

    # Execute
    reason = device_a.publish(target, b'{"forged": true}', qos=qos, retain=True)
    if qos == 0:  # no PUBACK: a QoS 1 publish on the same connection is handled after it
        device_a.publish(device_topic(pair.a, MessageKind.STATUS), qos=1)

    # Assert
    if qos == 1:  # MQTT 5: mosquitto answers the PUBACK with "not authorized" and drops the message
        assert reason is not None and reason.value == NOT_AUTHORIZED
    assert is_delivered_only_marker(watcher, target)
    assert device_a.wait_disconnect(0.05) is None  # denied, not disconnected


@pytest.mark.parametrize("kind", DEVICE_PUBLISHES, ids=str)
def test_a_device_can_publish_on_its_own_topics(
    pair: Pair, device_a: Probe, watcher: Probe, kind: MessageKind
) -> None:
    # Prepare
    topic = device_topic(pair.a, kind)
    assert not watcher.subscribe(topic).is_failure

    # Execute
    reason = device_a.publish(topic, b'{"from": "a"}')

    # Assert
    assert reason is not None and not reason.is_failure
    message = watcher.expect_message()
    assert message is not None and message.topic == topic and message.payload == b'{"from": "a"}'


def test_a_device_cannot_administer_the_broker(mosquitto: RunningBroker, device_a: Probe) -> None:
    # Prepare
    intruder = new_device_id("intruder")
    command = f'{{"commands": [{{"command": "createClient", "username": "{intruder}", "password": "pw"}}]}}'

    # Execute
    reason = device_a.publish(CONTROL_TOPIC, command)

    # Assert
    assert reason is not None and reason.value == NOT_AUTHORIZED
    with Probe(mosquitto.as_device(intruder, "pw"), intruder) as probe:
        refused = probe.connect()
    assert refused is not None and refused.is_failure


FORBIDDEN_SUBSCRIBE: dict[str, Topic] = {
    **{f"b's {kind}": topic_of("b", kind) for kind in MessageKind},
    **{f"own {kind}": topic_of("a", kind) for kind in DEVICE_PUBLISHES},
    "diredi/#": lambda p: "diredi/#",
    "every device's status": lambda p: "diredi/v1/dev/+/status",
    "every device's cmd": lambda p: "diredi/v1/dev/+/cmd",
    "#": lambda p: "#",
    "$SYS/#": lambda p: "$SYS/#",
    "+/+": lambda p: "+/+",
    "dynamic-security control": lambda p: "$CONTROL/dynamic-security/#",
    "own # wildcard": lambda p: f"diredi/v1/dev/{p.a}/#",
    "own + wildcard": lambda p: f"diredi/v1/dev/{p.a}/+",
    "own model/+ wildcard": lambda p: f"diredi/v1/dev/{p.a}/model/+",
    "own cmd, shared": lambda p: f"$share/g/{device_topic(p.a, MessageKind.CMD)}",
}


@pytest.mark.parametrize("topic", FORBIDDEN_SUBSCRIBE.values(), ids=FORBIDDEN_SUBSCRIBE.keys())
def test_a_device_cannot_subscribe_beyond_its_own_topics(pair: Pair, device_a: Probe, topic: Topic) -> None:
    # Execute
    reason = device_a.subscribe(topic(pair))

    # Assert
    assert reason.value >= 0x80
    assert reason.value == NOT_AUTHORIZED


def test_a_refused_subscription_receives_nothing(pair: Pair, device_a: Probe, watcher: Probe) -> None:
    # Prepare
    target = device_topic(pair.b, MessageKind.CMD)
    device_a.subscribe(target)

    # Execute
    watcher.publish(target, b'{"for": "b"}')

    # Assert
    assert device_a.expect_message(0.5) is None


@pytest.mark.parametrize("kind", DEVICE_SUBSCRIBES, ids=str)
def test_a_device_can_subscribe_to_its_own_topics_and_receives_the_cloud(
    pair: Pair, device_a: Probe, watcher: Probe, kind: MessageKind
) -> None:
    # Prepare
    topic = device_topic(pair.a, kind)

    # Execute
    reason = device_a.subscribe(topic)
    watcher.publish(topic, b'{"for": "a"}')

    # Assert
    assert not reason.is_failure and reason.value == 1  # granted QoS 1
    message = device_a.expect_message()
    assert message is not None and message.topic == topic and message.payload == b'{"for": "a"}'


CLIENT_IDS: dict[str, Callable[[Pair], str]] = {
    "b's id": lambda p: p.b,
    "a longer id": lambda p: f"{p.a}-2",
    "an unrelated id": lambda p: "someone-else",
}


@pytest.mark.parametrize("client_id", CLIENT_IDS.values(), ids=CLIENT_IDS.keys())
def test_a_device_cannot_connect_with_a_client_id_other_than_its_device_id(
    mosquitto: RunningBroker, pair: Pair, client_id: Callable[[Pair], str]
) -> None:
    # Execute
    with Probe(mosquitto.as_device(pair.a, pair.a_secret), client_id(pair)) as probe:
        reason = probe.connect()

    # Assert
    assert reason is not None and reason.value == NOT_AUTHORIZED


def test_a_device_cannot_take_over_another_devices_session(mosquitto: RunningBroker, pair: Pair) -> None:
    # Prepare
    with Probe(mosquitto.as_device(pair.b, pair.b_secret), pair.b) as device_b:
        assert device_b.connect() is not None

        # Execute
        with Probe(mosquitto.as_device(pair.a, pair.a_secret), pair.b) as impostor:
            reason = impostor.connect()

        # Assert
        assert reason is not None and reason.is_failure
        assert device_b.wait_disconnect(0.3) is None


@pytest.mark.parametrize("device_id", ["diredi-ingest-1", "diredi-publisher-1", "diredi-admin-1"])
def test_no_device_client_is_made_in_the_services_namespace(device_id: str) -> None:
    with pytest.raises(ValueError, match="cloud's own services"):
        provision_commands(device_id, secrets.token_urlsafe(32))


def test_a_subscription_without_a_receive_grant_delivers_nothing(
    mosquitto: RunningBroker, pair: Pair, watcher: Probe
) -> None:
    # Prepare: a client whose role lets it subscribe to the fleet but grants no receiving, as a session
    # inherited by a client of another role would be.
    name = new_device_id("subonly")
    password = secrets.token_urlsafe(16)
    acls = [{"acltype": "subscribePattern", "topic": "diredi/v1/#", "priority": 0, "allow": True}]
    with DynsecAdmin(mosquitto.admin) as admin:
        admin.execute(
            [
                {"command": "createRole", "rolename": name, "acls": acls},
                {
                    "command": "createClient",
                    "username": name,
                    "password": password,
                    "clientid": name,
                    "roles": [{"rolename": name, "priority": 0}],
                },
            ]
        )
    target = device_topic(pair.b, MessageKind.CMD)
    with Probe(mosquitto.target.with_credentials(name, password), name) as probe:
        connected = probe.connect()
        assert connected is not None and not connected.is_failure
        reason = probe.subscribe(target)

        # Execute
        watcher.publish(target, b'{"for": "b"}')

        # Assert
        assert not reason.is_failure  # subscribed...
        assert probe.expect_message(0.5) is None  # ...but nothing is delivered


BAD_LOGINS: dict[str, Callable[[RunningBroker, Pair], tuple[str | None, str | None, str]]] = {
    "anonymous": lambda m, p: (None, None, p.a),
    "username without password": lambda m, p: (p.a, None, p.a),
    "empty password": lambda m, p: (p.a, "", p.a),
    "wrong password": lambda m, p: (p.a, p.a_secret + "x", p.a),
    "another device's secret": lambda m, p: (p.a, p.b_secret, p.a),
    "unknown user": lambda m, p: ("cam-nobody", p.a_secret, "cam-nobody"),
    "the admin with a device's secret": lambda m, p: (m.admin.username, p.a_secret, "admin-x"),
}


@pytest.mark.parametrize("login", BAD_LOGINS.values(), ids=BAD_LOGINS.keys())
def test_the_broker_refuses_bad_logins(
    mosquitto: RunningBroker,
    pair: Pair,
    login: Callable[[RunningBroker, Pair], tuple[str | None, str | None, str]],
) -> None:
    # Prepare
    username, password, client_id = login(mosquitto, pair)
    target = dataclasses.replace(mosquitto.target, username=username, password=password)

    # Execute
    with Probe(target, client_id) as probe:
        reason = probe.connect()

    # Assert: MQTT 5 "not authorized" (mosquitto does not tell a bad password from an unknown user)
    assert reason is not None and reason.value in (0x86, NOT_AUTHORIZED)


def test_a_revoked_device_is_refused_when_it_reconnects(mosquitto: RunningBroker) -> None:
    # Prepare
    device = new_device_id()
    secret = provisioned_device(mosquitto, device)
    with DynsecAdmin(mosquitto.admin) as admin:
        admin.execute(revoke_commands(device))

    # Execute
    with Probe(mosquitto.as_device(device, secret), device) as probe:
        reason = probe.connect()

    # Assert
    assert reason is not None and reason.value == NOT_AUTHORIZED


def test_revoking_a_connected_device_ends_its_session(mosquitto: RunningBroker) -> None:
    # Prepare
    device = new_device_id()
    secret = provisioned_device(mosquitto, device)
    with Probe(mosquitto.as_device(device, secret), device) as probe:
        assert probe.connect() is not None

        # Execute
        with DynsecAdmin(mosquitto.admin) as admin:
            admin.execute(revoke_commands(device))

        # Assert
        reason = probe.wait_disconnect()
        assert reason is not None and reason.value == 0x98  # "administrative action"


def test_the_cloud_shares_device_messages_between_the_members_of_a_group(
    mosquitto: RunningBroker, pair: Pair, device_a: Probe
) -> None:
    # Prepare
    group = new_device_id("ingest")
    with Probe(mosquitto.cloud, f"{group}-1") as one, Probe(mosquitto.cloud, f"{group}-2") as two:
        assert one.connect() is not None and two.connect() is not None
        reasons = [p.subscribe(device_filter(MessageKind.STATUS, shared_group=group)) for p in (one, two)]

        # Execute
        sent = [f'{{"n": {n}}}'.encode() for n in range(6)]
        for payload in sent:
            device_a.publish(device_topic(pair.a, MessageKind.STATUS), payload)

        # Assert
        assert all(r.value == 1 for r in reasons)
        received = collect((one, two), len(sent))
        assert sorted(received[0] + received[1]) == sorted(sent)  # each message once, to one member
        assert received[0] and received[1]  # mosquitto hands them out in turn


CLOUD_FORBIDDEN = ["#", "$SYS/#", "$CONTROL/dynamic-security/#", "$share/g/#", "other/topic"]


@pytest.mark.parametrize("topic", CLOUD_FORBIDDEN)
def test_the_cloud_account_is_confined_to_the_fleet_topics(watcher: Probe, topic: str) -> None:
    # Execute
    reason = watcher.subscribe(topic)

    # Assert
    assert reason.value == NOT_AUTHORIZED


def test_the_tls_listener_admits_a_device_that_trusts_the_lab_ca(
    mosquitto: RunningBroker, pair: Pair, watcher: Probe
) -> None:
    # Prepare
    assert mosquitto.tls is not None
    topic = device_topic(pair.a, MessageKind.STATUS)
    watcher.subscribe(topic)

    # Execute
    with Probe(mosquitto.tls.with_credentials(pair.a, pair.a_secret), pair.a) as probe:
        connected = probe.connect()
        published = probe.publish(topic, b'{"over": "tls"}')

    # Assert
    assert connected is not None and not connected.is_failure
    assert published is not None and not published.is_failure
    message = watcher.expect_message()
    assert message is not None and message.payload == b'{"over": "tls"}'


def test_the_tls_listener_is_refused_by_a_client_that_does_not_trust_the_ca(
    mosquitto: RunningBroker, pair: Pair
) -> None:
    # Prepare: the system's CAs only
    assert mosquitto.tls is not None
    untrusting = dataclasses.replace(mosquitto.tls, ca_file=None)

    # Execute
    with Probe(untrusting.with_credentials(pair.a, pair.a_secret), pair.a) as probe:
        reason = probe.connect()

    # Assert: no MQTT connection at all (the certificate did not verify)
    assert reason is None


def test_the_tls_listener_still_needs_credentials(mosquitto: RunningBroker, pair: Pair) -> None:
    # Prepare
    assert mosquitto.tls is not None

    # Execute
    with Probe(mosquitto.tls.with_credentials(pair.a, "wrong"), pair.a) as probe:
        reason = probe.connect()

    # Assert
    assert reason is not None and reason.value == NOT_AUTHORIZED


def test_a_knowledge_report_of_256_kib_fits_a_larger_packet_does_not(
    pair: Pair, device_a: Probe, watcher: Probe
) -> None:
    # Prepare
    topic = device_topic(pair.a, MessageKind.KNOWLEDGE)
    watcher.subscribe(topic)

    # Execute
    fits = device_a.publish(topic, b"k" * 262_144)
    device_a.client.publish(topic, b"x" * 270_000, qos=1)  # may fail as it is written: the broker hangs up

    # Assert
    assert fits is not None and not fits.is_failure
    message = watcher.expect_message()
    assert message is not None and len(message.payload) == 262_144
    assert device_a.wait_disconnect() is not None  # the broker drops a client that sends too much
    assert watcher.expect_message(0.3) is None


def test_a_disconnected_subscriber_gets_a_backlog_well_beyond_the_default_queue(
    mosquitto: RunningBroker, pair: Pair
) -> None:
    # Prepare: an ingest-like persistent session, then away
    client_id = new_device_id("backlog")
    topic = device_topic(pair.a, MessageKind.STATUS)
    with Probe(mosquitto.cloud, client_id, persistent=True) as ingest:
        assert ingest.connect() is not None
        ingest.subscribe(topic)
    count = 5_000  # mosquitto's default max_queued_messages (1000) would keep a fifth of these

    # Execute
    with Probe(mosquitto.as_device(pair.a, pair.a_secret), pair.a) as device:
        device.client.max_inflight_messages_set(100)
        assert device.connect() is not None
        sent = [device.client.publish(topic, b"{}", qos=1) for _ in range(count)]
        for info in sent:
            info.wait_for_publish(10)

    # Assert
    with Probe(mosquitto.cloud, client_id, persistent=True) as ingest:
        assert ingest.connect() is not None
        received = 0
        while received < count and ingest.expect_message(10) is not None:  # a loaded broker may pause
            received += 1
    assert received == count


# --- the configuration and the process (broker/mosquitto.py) -------------------------------------------


def test_a_service_account_logs_in_only_with_its_own_client_id(mosquitto: RunningBroker, pair: Pair) -> None:
    # Prepare: an ingest's own account, and device b connected
    name = f"diredi-ingest-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(16)
    ensure_service_account(mosquitto.admin, name, password)
    account = mosquitto.target.with_credentials(name, password)

    with Probe(mosquitto.as_device(pair.b, pair.b_secret), pair.b) as device_b:
        assert device_b.connect() is not None

        # Execute: the service's account with a device's client id, another service's, and its own
        with Probe(account, pair.b) as as_device:
            taking_device = as_device.connect()
        with Probe(account, "diredi-ingest-someone-else") as as_other:
            taking_service = as_other.connect()
        with Probe(account, name) as as_itself:
            own = as_itself.connect()
            granted = as_itself.subscribe(device_filter(MessageKind.STATUS, shared_group="g"))

        # Assert: refused, so the device keeps its session; its own id works with the cloud's role
        assert taking_device is not None and taking_device.value == NOT_AUTHORIZED
        assert taking_service is not None and taking_service.value == NOT_AUTHORIZED
        assert device_b.wait_disconnect(0.3) is None
        assert own is not None and not own.is_failure and granted.value == 1
