"""mosquitto in certificate mode (broker/mosquitto-certificate.conf): devices log in with a certificate of
the fleet CA and one pattern ACL governs them all; the ACL attack matrix with certificate devices: another
device's topics, another device's client id, no certificate, another CA, an expired certificate, and a
revoked one once the CRL is reloaded (SIGHUP)."""

from __future__ import annotations

import os
import secrets
import signal
import ssl
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.client import BrokerTarget
from broker.exceptions import MosquittoError
from cloud.children import free_ports
from cloud.fleet_ca import FleetCA
from device_firmware_py.identity import device_key, signing_request
from tests.brokers import CERTS_SCRIPT, CLOUD_USER
from tests.polling import wait_until
from testsupport.mosquitto import MosquittoProcess
from wire.topics import MessageKind, device_topic

NOT_AUTHORIZED = 0x87


@dataclass
class Broker:
    ca: FleetCA
    ca_file: Path  # the server's (lab) CA, which clients trust
    device_port: int
    service: BrokerTarget  # the cloud's account, on the services' listener
    process: MosquittoProcess
    work: Path


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    from broker.mosquitto import bootstrap, find_binary, find_plugin, init_dynsec, render_config

    try:
        find_binary("mosquitto")
        find_plugin()
    except MosquittoError as exc:
        pytest.skip(f"no mosquitto here: {exc}")
    work = tmp_path_factory.mktemp("mtls")
    certs, state = work / "certs", work / "state"
    subprocess.run([str(CERTS_SCRIPT), str(certs)], check=True, capture_output=True, timeout=60)
    ca = FleetCA.open(work / "fleet-ca")
    crl = ca.write_crl([])
    service_port, device_port = free_ports(2)
    render_config(
        state,
        port=service_port,
        tls_port=device_port,
        cert_dir=certs,
        tls_bind="127.0.0.1",
        devices="certificate",
        fleet_ca=ca.directory / "ca.pem",
        crl_file=crl,
    )
    admin_password = secrets.token_urlsafe(24)
    init_dynsec(state, admin_user="admin", admin_password=admin_password)
    process = MosquittoProcess(state, port=service_port)
    process.start()
    try:
        target = BrokerTarget("127.0.0.1", service_port, tls=True, ca_file=certs / "ca.crt")
        cloud = target.with_credentials(CLOUD_USER, secrets.token_urlsafe(24))
        bootstrap(
            target.with_credentials("admin", admin_password),
            cloud_user=CLOUD_USER,
            cloud_password=str(cloud.password),
        )
        yield Broker(ca, certs / "ca.crt", device_port, cloud, process, work)
    finally:
        process.stop()


@dataclass
class Client:
    """A paho MQTT 5 client that records what happens to it."""

    paho: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)  # connected, refused or dropped
    refused: str = ""
    subscribed: set[int] = field(default_factory=set)
    acks: dict[int, ReasonCode] = field(default_factory=dict)
    received: list[str] = field(default_factory=list)


def connect(
    port: int,
    ca_file: Path,
    *,
    cert: tuple[Path, Path] | None = None,
    client_id: str = "",
    login: tuple[str, str] | None = None,
) -> Client:
    """A client connected within 5 s, or one whose `refused` says why not."""
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(*cert)
    paho.tls_set_context(context)
    if login is not None:
        paho.username_pw_set(*login)
    client = Client(paho)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            client.refused = str(reason)
        else:
            client.connected.set()
        client.answered.set()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        client.refused = client.refused or f"disconnected: {reason}"
        client.answered.set()

    paho.on_connect = on_connect
    paho.on_disconnect = on_disconnect

    def on_connect_fail(_c: mqtt.Client, _u: object) -> None:
        client.refused = client.refused or "connection failed"
        client.answered.set()

    paho.on_connect_fail = on_connect_fail
    paho.on_subscribe = lambda _c, _u, mid, _codes, _p: client.subscribed.add(mid)
    paho.on_publish = lambda _c, _u, mid, reason, _p: client.acks.__setitem__(mid, reason)
    paho.on_message = lambda _c, _u, message: client.received.append(message.topic)
    try:
        paho.connect("127.0.0.1", port, keepalive=30)
    except (ssl.SSLError, OSError) as exc:
        client.refused = f"TLS: {exc}"
        return client
    paho.loop_start()
    client.answered.wait(10)
    if not client.connected.is_set():
        client.refused = client.refused or "no CONNACK"
        paho.loop_stop()
    return client


def subscribe(client: Client, topic: str) -> None:
    """Subscribe (QoS 1) and return once the broker acknowledged it."""
    _, mid = client.paho.subscribe(topic, qos=1)
    wait_until(lambda: mid in client.subscribed, timeout=5, missing=f"the SUBACK of {topic}")


def close(*clients: Client) -> None:
    for client in clients:
        client.paho.disconnect()
        client.paho.loop_stop()


def publish(client: Client, topic: str) -> int:
    """The reason code of the PUBACK of one QoS 1 message."""
    info = client.paho.publish(topic, b"{}", qos=1)
    wait_until(lambda: info.mid in client.acks, timeout=5, missing="a PUBACK")
    return client.acks[info.mid].value


def device_files(ca: FleetCA, work: Path, device_id: str, **issue: object) -> tuple[Path, Path, int]:
    """A device's key (made as the device makes it) and its certificate from `ca`."""
    directory = work / "devices" / device_id
    directory.mkdir(parents=True, exist_ok=True)
    key = device_key(directory)
    issued = ca.issue(signing_request(key, device_id), device_id, **issue)  # type: ignore[arg-type]
    (directory / "cert.pem").write_text(issued.pem)
    return directory / "cert.pem", directory / "identity.key", issued.serial


VERIFY_FAILED = "certificate verify failed"  # another CA, expired, revoked
NO_CERTIFICATE = "peer did not return a certificate"


def refusals(broker: Broker) -> Counter[str]:
    """The TLS refusals the broker has logged so far, by reason."""
    text = (broker.work / "state" / "mosquitto.log").read_text()
    return Counter({reason: text.count(reason) for reason in (VERIFY_FAILED, NO_CERTIFICATE)})


def reload(broker: Broker) -> None:
    """SIGHUP: mosquitto re-reads its CRL."""
    pid = broker.process.pid
    assert pid is not None
    log = broker.work / "state" / "mosquitto.log"
    before = log.read_text().count("Reloading config")
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: log.read_text().count("Reloading config") > before, timeout=5, missing="the reload")


def test_a_device_publishes_its_own_topics_only_and_hears_only_its_own(broker: Broker) -> None:
    # Prepare: two devices, and the cloud on the services' listener
    one = device_files(broker.ca, broker.work, "cam-0001")
    device = connect(broker.device_port, broker.ca_file, cert=one[:2], client_id="cam-0001")
    assert not device.refused, device.refused
    subscribe(device, "diredi/v1/#")
    cloud = connect(
        broker.service.port, broker.ca_file, client_id=CLOUD_USER,
        login=(str(broker.service.username), str(broker.service.password)),
    )  # fmt: skip
    assert not cloud.refused, cloud.refused
    subscribe(cloud, f"diredi/v1/dev/+/{MessageKind.STATUS.value}")

    try:
        # Execute
        own = publish(device, device_topic("cam-0001", MessageKind.STATUS))
        other = publish(device, device_topic("cam-0002", MessageKind.STATUS))
        desired = publish(device, device_topic("cam-0001", MessageKind.MODEL_DESIRED))
        control = publish(device, "$CONTROL/dynamic-security/v1")
        for target in ("cam-0001", "cam-0002"):
            publish(cloud, device_topic(target, MessageKind.CMD))

        # Assert: its own status goes through; another's topics, its desired model and $CONTROL do not;
        # of the two commands it hears only its own
        assert own == 0 and (other, desired, control) == (NOT_AUTHORIZED,) * 3
        wait_until(
            lambda: device_topic("cam-0001", MessageKind.STATUS) in cloud.received,
            timeout=5,
            missing="the status",
        )
        wait_until(
            lambda: device_topic("cam-0001", MessageKind.CMD) in device.received,
            timeout=5,
            missing="its command",
        )
        assert device_topic("cam-0002", MessageKind.CMD) not in device.received
        assert cloud.received == [device_topic("cam-0001", MessageKind.STATUS)]
    finally:
        close(device, cloud)


def test_a_device_that_asks_for_another_client_id_is_itself_all_the_same(broker: Broker) -> None:
    # Prepare: cam-0002 is connected; cam-0003 asks for cam-0002's client id
    victim = connect(
        broker.device_port,
        broker.ca_file,
        cert=device_files(broker.ca, broker.work, "cam-0002")[:2],
        client_id="cam-0002",
    )
    three = device_files(broker.ca, broker.work, "cam-0003")

    try:
        # Execute
        impostor = connect(broker.device_port, broker.ca_file, cert=three[:2], client_id="cam-0002")
        as_victim = publish(impostor, device_topic("cam-0002", MessageKind.STATUS))

        # Assert: it is cam-0003 (its client id replaced by its CN), cam-0002 stays connected
        assert not impostor.refused and as_victim == NOT_AUTHORIZED
        assert publish(impostor, device_topic("cam-0003", MessageKind.STATUS)) < 0x80  # a success code
        assert victim.paho.is_connected()
    finally:
        close(victim, impostor)


def test_no_certificate_another_cas_or_an_expired_one_is_refused(broker: Broker) -> None:
    # Prepare: another CA's certificate for a real device id, and an expired one of the fleet CA
    stranger = device_files(FleetCA.open(broker.work / "another-ca"), broker.work / "stranger", "cam-0004")
    expired = device_files(
        broker.ca, broker.work / "expired", "cam-0005", days=1, now=datetime.now(UTC) - timedelta(days=3)
    )

    before = refusals(broker)

    # Execute
    refused = [
        connect(broker.device_port, broker.ca_file, client_id="cam-0006"),
        connect(broker.device_port, broker.ca_file, cert=stranger[:2], client_id="cam-0004"),
        connect(broker.device_port, broker.ca_file, cert=expired[:2], client_id="cam-0005"),
        connect(broker.device_port, broker.ca_file, client_id="cam-0006", login=("cam-0006", "a password")),
    ]

    # Assert: each refused by the TLS handshake, for the reason the broker logged
    assert all(client.refused for client in refused), [c.refused for c in refused]
    assert refusals(broker) - before == Counter({VERIFY_FAILED: 2, NO_CERTIFICATE: 2})


def test_a_revoked_certificate_is_refused_once_the_broker_reloads_its_crl(broker: Broker) -> None:
    # Prepare: cam-0007 connects fine
    cert, key, serial = device_files(broker.ca, broker.work, "cam-0007")
    before = connect(broker.device_port, broker.ca_file, cert=(cert, key), client_id="cam-0007")
    assert not before.refused, before.refused
    close(before)

    # Execute: revoked; the CRL rewritten and reloaded
    refused_before = refusals(broker)
    broker.ca.write_crl([(serial, datetime.now(UTC))])
    reload(broker)
    after = connect(broker.device_port, broker.ca_file, cert=(cert, key), client_id="cam-0007")
    other = connect(
        broker.device_port,
        broker.ca_file,
        cert=device_files(broker.ca, broker.work, "cam-0008")[:2],
        client_id="cam-0008",
    )

    # Assert: refused; a device not revoked still gets in
    try:
        assert after.refused and refusals(broker) - refused_before == Counter({VERIFY_FAILED: 1})
        assert not other.refused, other.refused
    finally:
        close(other)
        broker.ca.write_crl([])
        reload(broker)
