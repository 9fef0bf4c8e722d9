"""mosquitto in certificate mode for tests: a broker whose devices log in with certificates of a fleet CA,
and MQTT 5 clients that record what happens to them."""

from __future__ import annotations

import os
import secrets
import signal
import ssl
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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

NOT_AUTHORIZED = 0x87


@dataclass
class Broker:
    ca: FleetCA
    ca_file: Path  # the server's (lab) CA, which clients trust
    device_port: int
    service: BrokerTarget  # the cloud's account, on the services' listener
    admin: BrokerTarget  # the dynamic-security admin, on the same listener
    process: MosquittoProcess
    work: Path


@contextmanager
def certificate_broker(work: Path) -> Iterator[Broker]:
    """mosquitto in certificate mode with its state in `work` (skips the test where there is none):
    devices on a mutual-TLS listener, the cloud's account on the services' one."""
    from broker.mosquitto import bootstrap, find_binary, find_plugin, init_dynsec, render_config

    try:
        find_binary("mosquitto")
        find_plugin()
    except MosquittoError as exc:
        pytest.skip(f"no mosquitto here: {exc}")
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
        admin = target.with_credentials("admin", admin_password)
        yield Broker(ca, certs / "ca.crt", device_port, cloud, admin, process, work)
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
