"""The embedded broker enforces the production ACL matrix (DESIGN §2), administered like mosquitto's
dynamic security: devices A and B are provisioned with the cloud's own commands over the control topic.

"Nothing is delivered" is shown with a sentinel: after the forbidden publish the same client publishes
an allowed message, and the broker handles one client's publishes in order, so when the sentinel is
the first message the subscriber sees, the forbidden one was dropped (no second of waiting per cell).
"""

from __future__ import annotations

import json
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.acl import CONTROL_TOPIC, RESPONSE_TOPIC, provision_commands, revoke_commands
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.embedded import MAX_PACKET_SIZE
from broker.embedded_thread import EmbeddedBrokerThread
from broker.exceptions import BrokerAdminError, EmbeddedBrokerError
from tests.brokers import RunningBroker
from tests.embedded_broker import STATE_FILE, Peer, control, control_raw, running_embedded_broker
from wire.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, MessageKind, device_topic

A, B = "cam-a", "cam-b"
SECRETS = {A: "a-secret-0123456789", B: "b-secret-9876543210"}
CLOUD_FEED = "diredi/v1/#"
SENTINEL = device_topic(A, MessageKind.STATUS)
ADMIN_PASSWORD = secrets.token_urlsafe(16)

Connect = Callable[..., Peer]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """One broker for the read-only cells: devices A and B provisioned, never changed."""
    with running_embedded_broker(tmp_path_factory.mktemp("embedded")) as broker:
        control(broker.admin, provision_commands(A, SECRETS[A]) + provision_commands(B, SECRETS[B]))
        yield broker


@pytest.fixture
def online(peers: Callable[..., Peer]) -> Connect:
    """Connect a paho client and check the broker accepted it."""

    def connect(target: BrokerTarget, client_id: str, **options: object) -> Peer:
        peer = peers(target, client_id, **options)
        reason = peer.connect()
        assert not reason.is_failure, reason
        return peer

    return connect


def device(broker: RunningBroker, device_id: str) -> BrokerTarget:
    return broker.as_device(device_id, SECRETS[device_id])


def watch(broker: RunningBroker, online: Connect) -> Peer:
    """The cloud's account, subscribed to every device topic."""
    cloud = online(broker.cloud, f"cloud-watch-{time.monotonic_ns()}")
    assert not cloud.subscribe(CLOUD_FEED).is_failure
    return cloud


def assert_silent(peer: Peer, seconds: float = 0.3) -> None:
    time.sleep(seconds)
    assert peer.messages.empty(), peer.messages.get().topic


FORBIDDEN_PUBLISH = [device_topic(B, kind) for kind in MessageKind] + [
    device_topic(A, kind) for kind in DEVICE_SUBSCRIBES
]


@pytest.mark.parametrize("topic", FORBIDDEN_PUBLISH)
def test_a_device_cannot_publish_outside_its_own_reports(
    fleet: RunningBroker, online: Connect, topic: str
) -> None:
    # Prepare
    cloud = watch(fleet, online)
    a = online(device(fleet, A), A)

    # Execute
    a.publish(topic, b"forged")
    a.publish(SENTINEL, b"sentinel")

    # Assert
    first = cloud.next_message()
    assert (first.topic, first.payload) == (SENTINEL, b"sentinel")
    assert not a.disconnected.is_set()  # dropped silently, like mosquitto


@pytest.mark.parametrize("kind", DEVICE_PUBLISHES)
def test_a_device_publishes_its_own_reports(fleet: RunningBroker, online: Connect, kind: MessageKind) -> None:
    # Prepare
    cloud = watch(fleet, online)
    a = online(device(fleet, A), A)

    # Execute
    a.publish(device_topic(A, kind), b'{"report": 1}')

    # Assert
    received = cloud.next_message()
    assert (received.topic, received.payload) == (device_topic(A, kind), b'{"report": 1}')


FORBIDDEN_FILTERS = [
    *(device_topic(B, kind) for kind in MessageKind),
    *(device_topic(A, kind) for kind in DEVICE_PUBLISHES),
    "diredi/#",
    "diredi/v1/#",
    "diredi/v1/dev/+/status",
    "diredi/v1/dev/+/cmd",
    f"diredi/v1/dev/{A}/#",
    f"diredi/v1/dev/{A}/+",
    f"diredi/v1/dev/{A}/model/+",
    "#",
    "+/+",
    "$SYS/#",
    "$CONTROL/#",
    RESPONSE_TOPIC,
]


@pytest.mark.parametrize("topic_filter", FORBIDDEN_FILTERS)
def test_a_device_cannot_subscribe_outside_its_own_commands(
    fleet: RunningBroker, online: Connect, topic_filter: str
) -> None:
    # Prepare
    a = online(device(fleet, A), A)

    # Execute
    reason = a.subscribe(topic_filter)

    # Assert
    assert reason.is_failure  # SUBACK 0x80
    assert not a.disconnected.is_set()


@pytest.mark.parametrize("kind", DEVICE_SUBSCRIBES)
def test_a_device_subscribes_to_its_own_commands(
    fleet: RunningBroker, online: Connect, kind: MessageKind
) -> None:
    # Prepare
    a = online(device(fleet, A), A)
    cloud = online(fleet.cloud, f"cloud-{kind.name}")

    # Execute
    reason = a.subscribe(device_topic(A, kind))
    cloud.publish(device_topic(A, kind), b'{"for": "a"}')

    # Assert
    assert reason.value == 1  # granted QoS 1
    received = a.next_message()
    assert (received.topic, received.payload) == (device_topic(A, kind), b'{"for": "a"}')


@pytest.mark.parametrize(
    ("topic_filter", "granted"),
    [
        ("diredi/v1/dev/+/status", True),
        ("diredi/v1/#", True),
        ("#", False),
        ("$SYS/#", False),
        (RESPONSE_TOPIC, False),
    ],
)
def test_the_cloud_subscribes_under_diredi_v1_only(
    fleet: RunningBroker, online: Connect, topic_filter: str, granted: bool
) -> None:
    # Prepare
    cloud = online(fleet.cloud, "cloud-subscriber")

    # Execute
    reason = cloud.subscribe(topic_filter)

    # Assert
    assert reason.is_failure is not granted


@pytest.mark.parametrize(
    ("username", "password", "client_id", "reason"),
    [
        (None, None, A, "Not authorized"),  # anonymous
        (A, "wrong-password", A, "Not authorized"),
        ("cam-nobody", "whatever", "cam-nobody", "Not authorized"),
        (A, SECRETS[A], B, "Not authorized"),  # A's credentials, B's client id
        (A, SECRETS[A], "cam-a-2", "Not authorized"),
        ("diredi-cloud", "wrong-password", "cloud", "Not authorized"),
    ],
)
def test_a_bad_login_is_refused(
    fleet: RunningBroker,
    peers: Callable[..., Peer],
    username: str | None,
    password: str | None,
    client_id: str,
    reason: str,
) -> None:
    # Prepare
    target = fleet.target if username is None else fleet.target.with_credentials(username, password or "")

    # Execute
    refused = peers(target, client_id).connect()

    # Assert
    assert str(refused) == reason


@pytest.mark.parametrize("persistent", [False, True])
def test_a_refused_login_leaves_the_live_session_alone(
    fleet: RunningBroker, online: Connect, peers: Callable[..., Peer], persistent: bool
) -> None:
    # Prepare
    a = online(device(fleet, A), A, persistent=True)
    assert not a.subscribe(device_topic(A, MessageKind.CMD)).is_failure
    cloud = online(fleet.cloud, "cloud-commander")

    # Execute
    as_b = peers(device(fleet, B), A, persistent=persistent).connect()
    wrong = peers(fleet.as_device(A, "wrong-password"), A, persistent=persistent).connect()
    cloud.publish(device_topic(A, MessageKind.CMD), b"still yours")

    # Assert
    assert as_b.is_failure and wrong.is_failure
    assert a.next_message().payload == b"still yours"
    assert not a.disconnected.is_set()


def raw_connect(
    target: BrokerTarget, client_id: str, *, keepalive: int = 30, will: tuple[str, bytes] | None = None
) -> tuple[socket.socket, int]:
    """Send a bare MQTT 3.1.1 CONNECT (clean session, username and password, optionally a QoS 1 will)
    and return the open connection and the CONNACK's return code. (paho would retry an empty client id
    with one of its own, and cannot fall silent without a second's wait for its thread.)"""
    assert target.username is not None and target.password is not None
    fields = [client_id.encode(), *([will[0].encode(), will[1]] if will else []), target.username.encode()]
    fields.append(target.password.encode())
    flags = 0xC2 | (0x0C if will else 0)  # username, password, clean session (+ will, QoS 1)
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + keepalive.to_bytes(2, "big")
    body += b"".join(len(f).to_bytes(2, "big") + f for f in fields)
    assert len(body) < 128  # a one-byte remaining length
    connection = socket.create_connection((target.host, target.port), timeout=5)
    connection.sendall(bytes([0x10, len(body)]) + body)
    connack = connection.recv(4)
    assert connack[:2] == b"\x20\x02"
    return connection, connack[3]


def test_an_empty_client_id_is_rejected(fleet: RunningBroker) -> None:
    # Execute
    connection, code = raw_connect(fleet.cloud, "")
    connection.close()

    # Assert
    assert code == 2  # identifier rejected: the broker never makes a client id up


def test_a_will_on_another_devices_topic_is_refused(fleet: RunningBroker, peers: Callable[..., Peer]) -> None:
    # Prepare
    a = peers(device(fleet, A), A)
    a.client.will_set(device_topic(B, MessageKind.PRESENCE), b'{"state": "offline"}', qos=1)

    # Execute
    reason = a.connect()

    # Assert
    assert str(reason) == "Not authorized"


def test_a_silent_device_is_disconnected_and_its_will_sent(fleet: RunningBroker, online: Connect) -> None:
    # Prepare
    cloud = watch(fleet, online)
    presence = device_topic(A, MessageKind.PRESENCE)

    # Execute
    connection, code = raw_connect(device(fleet, A), A, keepalive=1, will=(presence, b'{"state": "offline"}'))
    silent_since = time.monotonic()

    # Assert
    with connection:
        assert code == 0
        will = cloud.next_message(timeout=30)  # the broker waits 1.5 keepalives, rounded up: 2 s
        assert (will.topic, will.payload) == (presence, b'{"state": "offline"}')
        assert time.monotonic() - silent_since > 1.5
        assert connection.recv(1) == b""  # closed by the broker


def test_a_knowledge_report_of_256_kib_passes_and_a_larger_packet_ends_the_connection(
    fleet: RunningBroker, online: Connect
) -> None:
    # Prepare
    cloud = watch(fleet, online)
    a = online(device(fleet, A), A)
    knowledge = device_topic(A, MessageKind.KNOWLEDGE)
    largest = bytes(range(256)) * 1024  # 256 KiB

    # Execute
    accepted = a.publish(knowledge, largest, timeout=30)
    received = cloud.expect_message()
    a.publish(knowledge, b"x" * MAX_PACKET_SIZE, qos=0)

    # Assert: the broker acknowledged it (None: it hung up instead), and delivered it to the cloud
    assert accepted is not None and not accepted.is_failure, (accepted, a.wait_disconnect(0))
    assert received is not None, "the broker acknowledged the report but did not deliver it"
    assert received.payload == largest
    assert a.disconnected.wait(30)
    assert_silent(cloud)


def test_a_device_cannot_use_the_control_topic(fleet: RunningBroker, online: Connect) -> None:
    # Prepare
    a = online(device(fleet, A), A)
    evil = {
        "command": "createClient",
        "username": "evil",
        "password": "evil",
        "roles": [{"rolename": "admin"}],
    }

    # Execute
    a.publish(CONTROL_TOPIC, json.dumps({"commands": [evil]}).encode())
    listed = control(fleet.admin, [{"command": "listClients"}])

    # Assert
    assert "evil" not in listed[0]["data"]["clients"]
    assert_silent(a, 0.1)
    assert not a.disconnected.is_set()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'{"commands": "createClient"}',
        b'{"commands": [null, 5, "x"]}',
        b'{"commands": [{"command": "createClient", "username": ["x"]}]}',
        b'{"commands": [{"command": "deleteEverything"}]}',
        b'{"commands": [{"command": "createRole", "rolename": "r", "acls": [{"acltype": "subscribe"}]}]}',
    ],
)
def test_garbage_on_the_control_topic_gets_an_error_and_the_broker_keeps_serving(
    fleet: RunningBroker, online: Connect, payload: bytes
) -> None:
    # Execute
    response = control_raw(fleet.admin, payload)

    # Assert
    assert response["responses"] and all("error" in r for r in response["responses"])
    assert (
        control(fleet.admin, [{"command": "getClient", "username": A}])[0]["data"]["client"]["username"] == A
    )
    online(device(fleet, A), A)


def test_the_clouds_admin_client_works_unchanged(fleet: RunningBroker) -> None:
    # Prepare
    device_id = f"cam-{secrets.token_hex(4)}"

    # Execute
    with DynsecAdmin(fleet.admin) as admin:
        admin.execute(provision_commands(device_id, "a-secret"))
        got = admin.execute([{"command": "getClient", "username": device_id}])
        with pytest.raises(BrokerAdminError, match="Client not found"):
            admin.execute([{"command": "deleteClient", "username": "cam-nobody"}])
        admin.execute(revoke_commands(device_id))

    # Assert
    assert got[0]["data"]["client"]["clientid"] == device_id


def test_revoking_a_device_ends_its_session_and_its_login(
    embedded_broker: RunningBroker, peers: Connect
) -> None:
    # Prepare
    control(embedded_broker.admin, provision_commands(A, SECRETS[A]))
    a = peers(device(embedded_broker, A), A)
    assert not a.connect().is_failure

    # Execute
    responses = control(embedded_broker.admin, revoke_commands(A))

    # Assert
    assert responses == [{"command": "deleteClient"}, {"command": "deleteRole"}]
    assert a.disconnected.wait(30)
    assert str(peers(device(embedded_broker, A), A).connect()) == "Not authorized"


def test_a_disabled_device_is_disconnected_until_enabled(
    embedded_broker: RunningBroker, peers: Connect
) -> None:
    # Prepare
    control(embedded_broker.admin, provision_commands(A, SECRETS[A]))
    a = peers(device(embedded_broker, A), A)
    assert not a.connect().is_failure

    # Execute
    control(embedded_broker.admin, [{"command": "disableClient", "username": A}])
    disconnected = a.disconnected.wait(30)
    while_disabled = peers(device(embedded_broker, A), A).connect()
    control(embedded_broker.admin, [{"command": "enableClient", "username": A}])

    # Assert
    assert disconnected and str(while_disabled) == "Not authorized"
    assert not peers(device(embedded_broker, A), A).connect().is_failure


def test_a_refused_unsubscribe_keeps_the_subscription(
    embedded_broker: RunningBroker, online: Connect
) -> None:
    # Prepare
    cmd, receipt = device_topic(A, MessageKind.CMD), device_topic(A, MessageKind.RECEIPT)
    pinned = [{"acltype": "unsubscribeLiteral", "topic": cmd, "allow": False}]
    control(
        embedded_broker.admin,
        provision_commands(A, SECRETS[A])
        + [
            {"command": "createRole", "rolename": "pinned", "acls": pinned},
            {"command": "addClientRole", "username": A, "rolename": "pinned", "priority": 1},
        ],
    )
    a = online(device(embedded_broker, A), A)
    assert not a.subscribe(cmd).is_failure and not a.subscribe(receipt).is_failure
    cloud = online(embedded_broker.cloud, "cloud-commander")

    # Execute
    a.unsubscribe(cmd)
    a.unsubscribe(receipt)
    cloud.publish(receipt, b"not subscribed any more")
    cloud.publish(cmd, b"still subscribed")

    # Assert
    assert a.next_message().payload == b"still subscribed"


def test_the_state_survives_a_restart_in_an_owner_only_file(
    embedded_broker: RunningBroker, peers: Connect, tmp_path: Path
) -> None:
    # Prepare
    control(embedded_broker.admin, provision_commands(A, SECRETS[A]))
    state_file = tmp_path / "embedded-broker" / STATE_FILE

    # Execute
    embedded_broker.kill()
    embedded_broker.start()

    # Assert
    assert not peers(device(embedded_broker, A), A).connect().is_failure
    assert not peers(embedded_broker.cloud, "cloud-after-restart").connect().is_failure
    assert str(peers(device(embedded_broker, B), B).connect()) == "Not authorized"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    text = state_file.read_text()
    assert embedded_broker.admin.password is not None
    assert SECRETS[A] not in text and embedded_broker.admin.password not in text
    assert [p.name for p in state_file.parent.iterdir()] == [STATE_FILE]  # no temporary file left


def test_a_state_file_others_could_read_is_made_owner_only(tmp_path: Path) -> None:
    # Prepare
    state_file = tmp_path / STATE_FILE
    with EmbeddedBrokerThread(state_file, port=0, admin_password=ADMIN_PASSWORD):
        pass
    state_file.chmod(0o644)

    # Execute
    with EmbeddedBrokerThread(state_file, port=0):  # the admin password is only for a new state
        pass

    # Assert
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600


def test_a_new_state_needs_an_admin_password(tmp_path: Path) -> None:
    # Prepare
    server = EmbeddedBrokerThread(tmp_path / STATE_FILE, port=0)

    # Execute, Assert
    with pytest.raises(EmbeddedBrokerError, match="admin password"):
        server.start()
    assert not (tmp_path / STATE_FILE).exists()


def test_a_broken_state_file_is_refused_and_kept(tmp_path: Path) -> None:
    # Prepare
    state_file = tmp_path / STATE_FILE
    state_file.write_text('{"clients": "oops"}')
    server = EmbeddedBrokerThread(state_file, port=0, admin_password=ADMIN_PASSWORD)

    # Execute, Assert
    with pytest.raises(EmbeddedBrokerError, match="not a dynamic-security state"):
        server.start()
    assert state_file.read_text() == '{"clients": "oops"}'


def test_a_taken_port_is_an_error(tmp_path: Path) -> None:
    # Prepare
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedBrokerThread(tmp_path / STATE_FILE, port=port, admin_password=ADMIN_PASSWORD)

        # Execute, Assert
        with pytest.raises(EmbeddedBrokerError, match="cannot listen"):
            server.start()
