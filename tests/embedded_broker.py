"""Pytest plugin: the embedded broker of broker/embedded.py as a `RunningBroker`.

`embedded_broker` (function scope, ~0.1 s): a fresh broker on a free loopback port with a state file of
its own; deny by default and the cloud's service account, both sent as dynamic-security commands over
the control topic like the cloud does it on mosquitto. Also the helpers its tests use: `Peer`, a paho
client that records what the broker answered, and `control`, one admin round trip.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from broker.acl import (
    CONTROL_TOPIC,
    RESPONSE_TOPIC,
    Command,
    cloud_account_commands,
    default_access_commands,
)
from broker.client import BrokerTarget
from broker.embedded_thread import EmbeddedBrokerThread
from tests.brokers import EXPECTED, RunningBroker

ADMIN_USER = "admin"
CLOUD_USER = "diredi-cloud"
STATE_FILE = "dynamic-security.json"


class Peer:
    """A paho client of a test: connects, and records the CONNACK, SUBACKs, messages and disconnection."""

    def __init__(
        self, target: BrokerTarget, client_id: str, *, persistent: bool = False, keepalive: int = 30
    ):
        self.target = target
        self.client_id = client_id
        self.keepalive = keepalive
        self.client = target.client(client_id, persistent=persistent)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnected = threading.Event()
        self._connacks: queue.Queue[ReasonCode] = queue.Queue()
        self._subacks: queue.Queue[tuple[int, list[ReasonCode]]] = queue.Queue()
        self._unsubacks: queue.Queue[int] = queue.Queue()
        self._network: threading.Thread | None = None
        self._stopping = threading.Event()

    def connect(self, timeout: float = 5.0) -> ReasonCode:
        """Connect and return the CONNACK's reason. Once accepted, a thread of this peer runs paho's
        network loop until the connection ends; a test client never connects again by itself."""
        self.disconnected.clear()
        self.target.connect(self.client, keepalive=self.keepalive)
        self.client.reconnect()
        deadline = time.monotonic() + timeout
        while self._connacks.empty():
            if time.monotonic() > deadline:
                raise TimeoutError("no CONNACK")
            self.client.loop(0.01)
        reason = self._connacks.get_nowait()
        if not reason.is_failure:
            self._network = threading.Thread(target=self._loop, name=f"peer-{self.client_id}", daemon=True)
            self._network.start()
        return reason

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> ReasonCode:
        """Subscribe and return the SUBACK's reason (a failure when the broker refused)."""
        result, mid = self.client.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        acked, reasons = self._subacks.get(timeout=timeout)
        assert acked == mid
        return reasons[0]

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> None:
        """Unsubscribe and wait for the UNSUBACK (3.1.1 has no reason code: a refusal looks the same)."""
        result, mid = self.client.unsubscribe(topic_filter)
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        assert self._unsubacks.get(timeout=timeout) == mid

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait until the broker acknowledged it (QoS 1) or it was written (QoS 0)."""
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5.0)

    def next_message(self, timeout: float = EXPECTED) -> mqtt.MQTTMessage:
        """The next message delivered to this peer (raises queue.Empty if none came within `timeout`)."""
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self._stopping.set()
        if self._network is not None:
            self._network.join()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self.client.loop(0.02) != mqtt.MQTT_ERR_SUCCESS:
                return  # the connection ended

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, properties: object
    ) -> None:
        self._connacks.put(reason)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: list[ReasonCode], properties: object
    ) -> None:
        self._subacks.put((mid, reasons))

    def _on_unsubscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: list[ReasonCode], properties: object
    ) -> None:
        self._unsubacks.put(mid)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, properties: object
    ) -> None:
        self.disconnected.set()


def control_raw(admin: BrokerTarget, payload: bytes, *, timeout: float = 5.0) -> dict[str, Any]:
    """Publish `payload` on the control topic as the admin; return the broker's JSON response."""
    peer = Peer(admin, f"test-admin-{secrets.token_hex(4)}")
    try:
        reason = peer.connect(timeout)
        assert not reason.is_failure, f"the admin was refused: {reason}"
        assert not peer.subscribe(RESPONSE_TOPIC).is_failure
        peer.publish(CONTROL_TOPIC, payload)
        response: dict[str, Any] = json.loads(peer.next_message(timeout).payload)
        return response
    finally:
        peer.close()


def control(admin: BrokerTarget, commands: Sequence[Command], *, check: bool = True) -> list[dict[str, Any]]:
    """Run dynamic-security commands as the admin; the response to each. `check`: fail on any error."""
    responses: list[dict[str, Any]] = control_raw(admin, json.dumps({"commands": list(commands)}).encode())[
        "responses"
    ]
    if check:
        assert [r for r in responses if "error" in r] == []
    return responses


@contextmanager
def running_embedded_broker(state_dir: Path) -> Iterator[RunningBroker]:
    """A started embedded broker (state in `state_dir`) with deny-by-default and the cloud's account."""
    admin_password, cloud_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    server = EmbeddedBrokerThread(
        state_dir / STATE_FILE, port=0, admin_user=ADMIN_USER, admin_password=admin_password
    )
    server.start()
    try:
        admin = server.target.with_credentials(ADMIN_USER, admin_password)
        control(admin, default_access_commands() + cloud_account_commands(CLOUD_USER, cloud_password))
        yield RunningBroker(
            kind="embedded",
            target=server.target,
            admin=admin,
            cloud=server.target.with_credentials(CLOUD_USER, cloud_password),
            shared_subscriptions=False,
            kill=server.kill,
            start=server.start,
        )
    finally:
        server.stop()


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A fresh embedded broker for one test."""
    with running_embedded_broker(tmp_path / "embedded-broker") as broker:
        yield broker
