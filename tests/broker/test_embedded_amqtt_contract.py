"""What broker/embedded.py relies on in amqtt, checked against the installed amqtt: the exact pin, the
three private methods it overrides, and the undocumented parts it uses. An amqtt upgrade fails here
first, each failure naming what to re-check (docs/embedded-broker.md, "Its dependency on amqtt").
The last test shows on the wire what one of the overrides is for.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import queue
import re
import secrets
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from amqtt.adapters import ReaderAdapter  # type: ignore[import-untyped]
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.contexts import Action, ListenerType  # type: ignore[import-untyped]
from amqtt.mqtt.protocol.broker_handler import (  # type: ignore[import-untyped]
    BrokerProtocolHandler,
    UnSubscription,
)
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin  # type: ignore[import-untyped]
from amqtt.session import ApplicationMessage, Session  # type: ignore[import-untyped]

from broker.acl import provision_commands
from broker.embedded import _DynsecBroker
from broker.embedded_acl import DynamicSecurity
from tests.brokers import RunningBroker
from tests.embedded_broker import Peer, control
from wire.topics import MessageKind, device_topic

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
UPGRADE = "see docs/embedded-broker.md, 'Its dependency on amqtt'"
INSTALLED = importlib.metadata.version("amqtt")

# The private methods of amqtt's Broker that _DynsecBroker overrides (each calls amqtt's own), what
# amqtt returns from each, and what to re-check in amqtt's new version of it.
OVERRIDES: dict[str, tuple[type | None, str]] = {
    "_handle_message_delivery": (
        bool,
        "the override serves a PUBLISH to a `$` topic ($CONTROL/dynamic-security/v1) and passes any "
        "other to amqtt's: re-check how amqtt treats a `$` topic, that it still asks the topic plugin "
        "(Action.PUBLISH) and what its return value means",
    ),
    "_handle_unsubscription": (
        None,
        "the override removes the filters dynsec refuses from `unsubscribe_waiter.result().topics`, "
        "then calls amqtt's: re-check that amqtt still unsubscribes exactly those topics",
    ),
    "_publish_retained_messages_for_subscription": (
        None,
        "the override passes only a subscription the session holds: re-check where amqtt calls it "
        "(after a SUBSCRIBE, and on every CONNECT for every filter of every client)",
    ),
}

# Public names of amqtt that its documentation does not describe, as broker/embedded.py uses them.
RELIED_ON: list[tuple[Any, str, str, str]] = [
    (Broker, "external_connected", "(self, reader, writer, listener_name)", "EmbeddedBroker._accept"),
    (BrokerProtocolHandler, "handle_connection_closed", "(self)", "kick, take_over"),
    (BrokerProtocolHandler, "mqtt_publish", "(self, topic, data, qos, retain, ack_timeout=None)", "control"),
    (UnSubscription, "__init__", "(self, packet_id, topics)", "_handle_unsubscription"),
    (BaseAuthPlugin, "authenticate", "(self, *, session)", "DynsecPlugin"),
    (BaseTopicPlugin, "topic_filtering", "(self, *, session=None, topic=None, action=None)", "DynsecPlugin"),
    (ReaderAdapter, "read", "(self, n=-1)", "_Gate"),
    (ReaderAdapter, "feed_eof", "(self)", "_Gate"),
]


def shape(function: Callable[..., Any]) -> str:
    """A signature without its annotations: names, kinds and defaults of the parameters."""
    signature = inspect.signature(function)
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def test_amqtt_is_pinned_exactly_and_installed_at_the_pin() -> None:
    # Prepare
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    groups = [project.get("dependencies", []), *project.get("optional-dependencies", {}).values()]
    requirements = [r for group in groups for r in group if re.match(r"amqtt\b", r)]

    # Execute
    pins = [re.fullmatch(r"amqtt\s*==\s*([0-9][\w.]*)", r) for r in requirements]

    # Assert
    assert len(pins) == 1 and pins[0], f"pyproject.toml must pin amqtt once, exactly (==): {requirements}"
    assert INSTALLED == pins[0][1], (
        f"amqtt {INSTALLED} is installed, pyproject.toml pins {pins[0][1]}: {UPGRADE}"
    )


@pytest.mark.parametrize("name", OVERRIDES)
def test_each_overridden_private_method_is_the_one_the_override_expects(name: str) -> None:
    returns, recheck = OVERRIDES[name]
    theirs = getattr(Broker, name, None)
    assert theirs is not None, f"amqtt {INSTALLED} has no Broker.{name}: the override is dead; {recheck}"
    ours = getattr(_DynsecBroker, name)

    assert inspect.iscoroutinefunction(theirs), (
        f"amqtt {INSTALLED}'s Broker.{name} is no coroutine: {recheck}"
    )
    assert shape(theirs) == shape(ours), (
        f"amqtt {INSTALLED}'s Broker.{name}{shape(theirs)} is not the override's {shape(ours)}: {recheck}"
    )
    returned = inspect.signature(theirs).return_annotation
    assert returned is returns, f"amqtt {INSTALLED}'s Broker.{name} now returns {returned}: {recheck}"


@pytest.mark.parametrize(
    ("owner", "name", "expected", "user"), RELIED_ON, ids=lambda v: getattr(v, "__name__", v)
)
def test_each_undocumented_method_used_has_the_signature_used(
    owner: Any, name: str, expected: str, user: str
) -> None:
    found = getattr(owner, name, None)
    assert found is not None, f"amqtt {INSTALLED} has no {owner.__name__}.{name} (used by {user}): {UPGRADE}"
    assert shape(found) == expected, (
        f"amqtt {INSTALLED}'s {owner.__name__}.{name}{shape(found)} is not {expected} ({user}): {UPGRADE}"
    )


def test_the_data_used_is_where_it_was() -> None:
    # Session fields (login, kick, take_over), messages (_handle_message_delivery), what a subscription
    # is (_publish_retained_messages_for_subscription), the external listener and the plugin's actions.
    session = Session()
    for field in ("client_id", "username", "clean_session", "will_flag", "will_retain"):
        assert hasattr(session, field), f"amqtt {INSTALLED}'s Session has no {field}: {UPGRADE}"
    assert session.transitions.is_connected() is False, f"Session.transitions.is_connected(): {UPGRADE}"
    assert {"topic", "data"} <= set(ApplicationMessage.__slots__), f"ApplicationMessage: {UPGRADE}"
    for name in ("sessions", "subscriptions"):
        assert isinstance(inspect.getattr_static(Broker, name), property), f"Broker.{name}: {UPGRADE}"
    assert ListenerType("external") is ListenerType.EXTERNAL, f"the external listener: {UPGRADE}"
    assert {a.value for a in Action} == {"publish", "subscribe", "receive"}, f"Action: {UPGRADE}"


def test_the_embedded_broker_adds_no_name_that_amqtt_uses() -> None:
    # Prepare: a name of ours that amqtt takes up later would silently override (or be overwritten).
    async def attributes() -> tuple[set[str], set[str]]:
        plain = Broker({"listeners": {"default": {"type": "external"}}, "plugins": {}})
        ours = _DynsecBroker(DynamicSecurity(), lambda state: None)
        return set(vars(plain)), set(vars(ours))

    # Execute
    theirs, ours = asyncio.run(attributes())
    methods = {name for name in vars(_DynsecBroker) if not name.startswith("__")} - set(OVERRIDES)

    # Assert
    assert not methods & set(dir(Broker)), f"amqtt {INSTALLED}'s Broker has {methods & set(dir(Broker))} now"
    added = {"dynsec", "save_state"}
    assert ours - theirs == added, f"amqtt {INSTALLED}'s Broker sets {added & theirs} itself now"


# --- Why an override exists, on the wire (test_embedded.py shows the other two: the control topic, a
# refused unsubscribe) ------------------------------------------------------------------------------


def provision(broker: RunningBroker, device_id: str) -> Peer:
    """A provisioned device's connected client."""
    secret = secrets.token_urlsafe(12)
    control(broker.admin, provision_commands(device_id, secret))
    peer = Peer(broker.as_device(device_id, secret), device_id)
    assert not peer.connect().is_failure
    return peer


def test_a_client_gets_no_retained_message_of_a_filter_it_did_not_subscribe_to(
    embedded_broker: RunningBroker,
) -> None:
    # Prepare: the cloud's filter covers B's retained presence; amqtt would send it to every new client.
    cloud = Peer(embedded_broker.cloud, "cloud-watch")
    a: Peer | None = None
    b = provision(embedded_broker, "cam-b")
    try:
        assert not cloud.connect().is_failure and not cloud.subscribe("diredi/v1/#").is_failure
        b.publish(device_topic("cam-b", MessageKind.PRESENCE), b'{"state": "online"}', retain=True)
        assert cloud.next_message().retain is False  # delivered live; retained for later subscribers

        # Execute
        a = provision(embedded_broker, "cam-a")

        # Assert
        with pytest.raises(queue.Empty):
            a.next_message(timeout=0.3)
    finally:
        for peer in (cloud, b, a):
            if peer is not None:
                peer.close()
