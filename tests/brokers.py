"""Pytest plugin: real brokers for the MQTT tests, each described by a `RunningBroker`.

- `mosquitto` (session): mosquitto 2 with the production configuration of `broker/` (dynamic
  security, deny by default, persistence), started on a free loopback port in a state directory of
  its own. Needs the mosquitto binary (`scripts/services.sh mosquitto`, which `make test` runs).
- `embedded_broker` (in tests/embedded_broker.py): the amqtt broker of `broker/embedded.py`,
  with the same credentials and ACL.

Helpers: `provisioned_device(broker, device_id)` registers a device and returns its secret;
`Probe` drives one paho client synchronously (connect, subscribe, publish, wait for messages).
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
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
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


def stay_down(client: mqtt.Client) -> None:
    """From a paho callback: end the network thread instead of letting it reconnect."""
    client.disconnect()
    client.loop_stop()  # on paho's own thread this only flags the loop to end


class Probe:
    """One paho client for tests, driven synchronously: each call waits for the broker's answer.

    Answers arrive on paho's thread and are handed over through queues; a refused or lost connection
    is not retried."""

    def __init__(self, target: BrokerTarget, client_id: str, *, persistent: bool = False) -> None:
        self.target = target
        self.persistent = persistent
        self.client = target.client(client_id, persistent=persistent)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self._connacks: queue.Queue[ReasonCode | None] = queue.Queue()  # None: not reachable
        self._acks: dict[int, queue.Queue[list[ReasonCode] | ReasonCode]] = {}
        self._acks_lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)

    def __enter__(self) -> Probe:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self, timeout: float = 5.0) -> ReasonCode | None:
        """Connect; the CONNACK's reason code, or None if no MQTT connection was made (TLS refused,
        nothing listening). A refused probe is stopped."""
        self.target.connect(self.client, persistent=self.persistent)
        self.client.loop_start()
        reason = self._connacks.get(timeout=timeout)
        if reason is None or reason.is_failure:
            self.close()
        return reason

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> ReasonCode:
        """Subscribe; the SUBACK's reason code for `topic` (≥ 0x80: refused)."""
        result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None, mqtt.error_string(result)
        codes = self._ack(mid).get(timeout=timeout)
        assert isinstance(codes, list)
        return codes[0]

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"{}",
        qos: int = 1,
        retain: bool = False,
        timeout: float = 5.0,
    ) -> ReasonCode | None:
        """Publish; for QoS 1 the PUBACK's reason code, else None once the packet is written."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        ack = self._ack(info.mid)  # the same queue whether paho's callback came first or not
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        reason = ack.get(timeout=timeout)
        assert not isinstance(reason, list)
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
        self.client.disconnect()
        self.client.loop_stop()

    def _ack(self, mid: int) -> queue.Queue[list[ReasonCode] | ReasonCode]:
        with self._acks_lock:
            return self._acks.setdefault(mid, queue.Queue())

    def _on_connect(
        self, client: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        if reason.is_failure:
            stay_down(client)
        self._connacks.put(reason)

    def _on_connect_fail(self, client: mqtt.Client, _u: object) -> None:
        stay_down(client)
        self._connacks.put(None)

    def _on_disconnect(
        self, client: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        stay_down(client)  # a probe that lost its connection stays down (tests make a new one)
        self.disconnects.put(reason)

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, mid: int, reasons: list[ReasonCode], _p: object
    ) -> None:
        self._ack(mid).put(reasons)

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        self._ack(mid).put(reason)
