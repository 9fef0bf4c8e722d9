"""Pytest plugin: the embedded broker of broker/embedded.py as a `RunningBroker`.

`embedded_broker` (function scope, ~0.1 s): a fresh broker on a free loopback port with a state file of
its own; deny by default and the cloud's service account, both sent as dynamic-security commands over
the control topic like the cloud does it on mosquitto. Also the helpers its tests use: `Peer`, a
`Probe` that records what the broker answered, and `control`, one admin round trip.
"""

from __future__ import annotations

import json
import queue
import secrets
from collections.abc import Callable, Iterator, Sequence
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
from tests.brokers import EXPECTED, Probe, RunningBroker

ADMIN_USER = "admin"
CLOUD_USER = "diredi-cloud"
STATE_FILE = "dynamic-security.json"


class Peer(Probe):
    """A `Probe` as the embedded broker's tests use it: `connect` always has a CONNACK to return,
    `next_message` raises when none came, and `unsubscribe`."""

    def __init__(
        self, target: BrokerTarget, client_id: str, *, persistent: bool = False, keepalive: int = 30
    ) -> None:
        super().__init__(target, client_id, persistent=persistent, keepalive=keepalive)
        self._unsubacks: queue.Queue[int] = queue.Queue()
        self.client.on_unsubscribe = lambda _c, _u, mid, _r, _p: self._unsubacks.put(mid)

    def connect(self, timeout: float = 5.0) -> ReasonCode:
        """Connect and return the CONNACK's reason (TimeoutError if none came)."""
        reason = super().connect(timeout)
        if reason is None:
            raise TimeoutError("no CONNACK")
        return reason

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> None:
        """Unsubscribe and wait for the UNSUBACK (3.1.1 has no reason code: a refusal looks the same)."""
        result, mid = self.client.unsubscribe(topic_filter)
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        assert self._unsubacks.get(timeout=timeout) == mid

    def next_message(self, timeout: float = EXPECTED) -> mqtt.MQTTMessage:
        """The next message delivered to this peer (raises queue.Empty if none came within `timeout`)."""
        return self.messages.get(timeout=timeout)


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


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    """Make paho clients (`peers(target, client_id, ...)`); all closed after the test."""
    made: list[Peer] = []

    def make(target: BrokerTarget, client_id: str, **options: object) -> Peer:
        peer = Peer(target, client_id, **options)  # type: ignore[arg-type]
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()
