"""Pytest plugin: real brokers for the MQTT tests, each described by a `RunningBroker`.

- `mosquitto` (session): mosquitto 2 with the production configuration of `broker/` (dynamic
  security, deny by default, persistence), started on a free loopback port in a state directory of
  its own. Needs the mosquitto binary (`scripts/services.sh mosquitto`, which `make test` runs).
- `embedded_broker` (in tests/embedded_broker.py): the amqtt broker of `broker/embedded.py`,
  with the same credentials and ACL.

Helpers: `provisioned_device(broker, device_id)` registers a device and returns its secret;
`Probe` drives one `BrokerConnection` synchronously (connect, subscribe, publish, wait for messages).
"""

from __future__ import annotations

import queue
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from broker.acl import provision_commands
from broker.client import BrokerTarget, ClientOptions
from broker.connection import BrokerConnection
from broker.dynsec import DynsecAdmin
from broker.exceptions import BrokerConnectError, BrokerPublishError, BrokerSubscribeError
from cloud.children import free_ports

ROOT = Path(__file__).resolve().parent.parent
CERTS_SCRIPT = ROOT / "broker" / "certs.sh"
CLOUD_USER = "diredi-cloud"
# How long a probe waits by default for a message or a disconnection that must come: milliseconds
# normally, seconds on a loaded machine. To show that none comes, pass a short timeout instead.
EXPECTED = 30.0


@dataclass
class RunningBroker:
    """A broker a test can talk to, and (for a real process) kill and start again."""

    kind: str  # "mosquitto" or "embedded"
    target: BrokerTarget  # where it listens, no credentials
    admin: BrokerTarget  # as the dynamic-security admin (creates and deletes device clients)
    cloud: BrokerTarget  # as the cloud's service account (ingest, publisher)
    shared_subscriptions: bool  # MQTT 5 shared subscriptions (mosquitto), or not (amqtt: 3.1.1)
    kill: Callable[[], None] = field(repr=False)  # SIGKILL, no clean shutdown
    start: Callable[[], None] = field(repr=False)  # start again on the same port and state
    tls: BrokerTarget | None = None  # its TLS listener, verified against the lab CA (mosquitto only)

    def as_device(self, device_id: str, secret: str) -> BrokerTarget:
        """The broker as one device's account."""
        return self.target.with_credentials(device_id, secret)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """mosquitto with the production configuration, a lab TLS certificate, deny-by-default dynamic
    security and the cloud's account, on free loopback ports; shared by the session's tests."""
    with running_mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@contextmanager
def running_mosquitto(state: Path) -> Iterator[RunningBroker]:
    """A mosquitto of its own in `state` (for tests whose counts must see no other test's traffic,
    such as the retained presence and late wills the session's broker carries)."""
    from broker.exceptions import MosquittoError
    from broker.mosquitto import bootstrap, find_binary, find_plugin, init_dynsec, render_config
    from testsupport.mosquitto import MosquittoProcess

    try:
        find_binary("mosquitto")
        find_binary("mosquitto_ctrl")
        find_plugin()
    except MosquittoError as exc:
        pytest.skip(f"no mosquitto here: {exc}")
    certs = state / "certs"
    subprocess.run([str(CERTS_SCRIPT), str(certs)], check=True, capture_output=True, timeout=60)
    port, tls_port = free_ports(2)
    render_config(state, port=port, tls_port=tls_port, cert_dir=certs, tls_bind="127.0.0.1")
    admin_password = secrets.token_urlsafe(24)
    init_dynsec(state, admin_user="admin", admin_password=admin_password)
    process = MosquittoProcess(state, port=port)
    process.start()
    try:
        target = BrokerTarget(host="127.0.0.1", port=port)
        admin = target.with_credentials("admin", admin_password)
        cloud = target.with_credentials(CLOUD_USER, secrets.token_urlsafe(24))
        bootstrap(admin, cloud_user=CLOUD_USER, cloud_password=str(cloud.password))
        yield RunningBroker(
            kind="mosquitto",
            target=target,
            admin=admin,
            cloud=cloud,
            shared_subscriptions=True,
            kill=process.kill,
            start=process.start,
            tls=BrokerTarget(host="127.0.0.1", port=tls_port, tls=True, ca_file=certs / "ca.crt"),
        )
    finally:
        process.stop()


def provisioned_device(broker: RunningBroker, device_id: str) -> str:
    """Register `device_id` with the broker (its client and role) and return its new secret."""
    secret = secrets.token_urlsafe(24)
    with DynsecAdmin(broker.admin) as admin:
        admin.execute(provision_commands(device_id, secret))
    return secret


def new_device_id(prefix: str = "dev") -> str:
    """A device id no other test uses (the session's broker is shared)."""
    return f"{prefix}-{secrets.token_hex(5)}"


class Probe:
    """One paho client for tests, driven synchronously: each call waits for the broker's answer and
    returns its reason code, a refusal included. A refused or lost connection is not retried."""

    def __init__(
        self, target: BrokerTarget, client_id: str, *, persistent: bool = False, keepalive: int = 30
    ) -> None:
        self.target = target
        options = ClientOptions(client_id, persistent=persistent, keepalive=keepalive)
        self.connection = BrokerConnection(target, options, timeout=5.0)
        self.client = self.connection.client
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.connection.on_disconnect = self._on_disconnect

    def __enter__(self) -> Probe:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self, timeout: float = 5.0) -> ReasonCode | None:
        """Connect; the CONNACK's reason code, or None if no MQTT connection was made (TLS refused,
        nothing listening, no answer). A refused probe is stopped."""
        try:
            return self.connection.connect(timeout)
        except BrokerConnectError as exc:
            return exc.reason

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> ReasonCode:
        """Subscribe; the SUBACK's reason code for `topic` (≥ 0x80: refused)."""
        try:
            return self.connection.subscribe(topic, qos=qos, timeout=timeout)[0]
        except BrokerSubscribeError as exc:
            if not exc.reasons:
                raise
            return exc.reasons[0]

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"{}",
        qos: int = 1,
        retain: bool = False,
        timeout: float = 5.0,
    ) -> ReasonCode | None:
        """Publish; for QoS 1 the PUBACK's reason code, else None once the packet is written. None
        too when the broker hung up instead of answering (`wait_disconnect` tells why)."""
        reason: ReasonCode | None
        try:
            reason = self.connection.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        except BrokerPublishError as exc:
            if exc.reason is None and self.connection.connected:
                raise  # no answer in time
            reason = exc.reason
        return reason if qos else None

    def expect_message(self, timeout: float = EXPECTED) -> mqtt.MQTTMessage | None:
        """The next message delivered to this probe, or None if none came within `timeout`."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_disconnect(self, timeout: float = EXPECTED) -> ReasonCode | None:
        """The reason code of the next disconnection, or None if the connection stayed up."""
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        self.connection.close()

    def _on_disconnect(self, reason: ReasonCode) -> None:
        self.disconnects.put(reason)
        self.disconnected.set()
