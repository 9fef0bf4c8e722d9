"""The client options and the builder of broker/client.py: what a paho client is made of, and the
options that cannot work refused with a clear error before any socket is opened."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from broker.client import BrokerTarget, ClientOptions, ReconnectPolicy, Will, build_client
from broker.exceptions import BrokerConnectError, BrokerError, ClientOptionsError

PASSWORD = secrets.token_urlsafe(12)
TARGET = BrokerTarget("127.0.0.1", 1883, username="cam-1", password=PASSWORD)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"client_id": ""}, "client id"),
        ({"client_id": None}, "client id"),
        ({"client_id": "x" * 70_000}, "client id"),
        ({"client_id": "cam-1", "keepalive": -1}, "keepalive"),
        ({"client_id": "cam-1", "keepalive": 70_000}, "keepalive"),
        ({"client_id": "cam-1", "keepalive": True}, "keepalive"),
        ({"client_id": "cam-1", "keepalive": 2.5}, "keepalive"),
        ({"client_id": "cam-1", "session_expiry": -5}, "session expiry"),
        ({"client_id": "cam-1", "session_expiry": 2**32}, "session expiry"),
        ({"client_id": "cam-1", "receive_maximum": 0}, "receive maximum"),
        ({"client_id": "cam-1", "max_inflight": 0}, "in-flight"),
        ({"client_id": "cam-1", "will": ("t", b"x")}, "will"),
        ({"client_id": "cam-1", "reconnect": 5}, "reconnect"),
    ],
)
def test_options_that_cannot_work_are_a_clear_value_error(options: dict[str, Any], named: str) -> None:
    # Execute
    with pytest.raises(ClientOptionsError, match=named) as raised:
        ClientOptions(**options)

    # Assert
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, BrokerError)


@pytest.mark.parametrize(
    ("will", "named"),
    [
        ({"topic": "a/b", "payload": b"x", "qos": 3}, "qos"),
        ({"topic": "a/b", "payload": b"x", "qos": -1}, "qos"),
        ({"topic": "a/+/b", "payload": b"x"}, "wildcards"),
        ({"topic": "", "payload": b"x"}, "topic"),
        ({"topic": "a/b", "payload": "text"}, "bytes"),
    ],
)
def test_a_will_that_cannot_work_is_a_clear_value_error(will: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Will(**will)


@pytest.mark.parametrize(("first", "longest"), [(0, 10), (5, 2), (1, -1)])
def test_a_reconnect_policy_that_cannot_work_is_a_clear_value_error(first: int, longest: int) -> None:
    with pytest.raises(ValueError, match="reconnect delay"):
        ReconnectPolicy(first, longest)


def test_the_client_is_built_as_the_options_say() -> None:
    # Prepare
    will = Will("fleet/cam-1/presence", b'{"state": "offline"}', qos=1, retain=True)
    options = ClientOptions(
        "cam-1", persistent=True, will=will, max_inflight=7, reconnect=ReconnectPolicy(2, 30)
    )

    # Execute
    client = build_client(TARGET, options)

    # Assert
    assert client.protocol == mqtt.MQTTv5
    assert (client.username, client.password) == ("cam-1", PASSWORD)
    assert (client.will_topic, client.will_payload) == ("fleet/cam-1/presence", b'{"state": "offline"}')
    assert client.max_inflight_messages == 7


def test_an_unreadable_ca_file_is_a_connect_error_naming_the_file(tmp_path: Path) -> None:
    # Prepare
    password = secrets.token_urlsafe(12)
    target = BrokerTarget(
        "broker.example", 8883, "admin", password, tls=True, ca_file=tmp_path / "missing.crt"
    )

    # Execute
    with pytest.raises(BrokerConnectError) as raised:
        build_client(target, ClientOptions("admin-1"))

    # Assert
    assert "missing.crt" in str(raised.value) and "FileNotFoundError" in str(raised.value)
    assert password not in str(raised.value)
