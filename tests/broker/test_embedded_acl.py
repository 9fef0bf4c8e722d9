"""The embedded broker's dynamic-security model without a network: topic matching, ACL evaluation,
logins, the control commands and the state document."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import dynsec_state
from broker.acl import (
    CONTROL_TOPIC,
    RESPONSE_TOPIC,
    cloud_account_commands,
    default_access_commands,
    provision_commands,
    revoke_commands,
)
from broker.dynsec_state import (
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    Client,
    filter_covered,
    topic_matches,
    valid_filter,
)
from broker.embedded_acl import DynamicSecurity
from wire.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, MessageKind, device_topic

A, B = "cam-a", "cam-b"


def execute(state: DynamicSecurity, *commands: dict[str, Any]) -> list[dict[str, Any]]:
    responses: list[dict[str, Any]] = state.execute(
        json.dumps({"commands": list(commands)}).encode()
    ).response["responses"]
    return responses


def create_role(*acls: Any) -> dict[str, Any]:
    return {"command": "createRole", "rolename": "r", "acls": list(acls)}


def add_role(rolename: str) -> dict[str, Any]:
    return {"command": "addClientRole", "username": A, "rolename": rolename}


def fleet() -> DynamicSecurity:
    """The admin, deny by default, the cloud's account and devices A and B, as the cloud sends them."""
    state = DynamicSecurity.initial("admin", "admin-pw")
    commands = default_access_commands() + cloud_account_commands("cloud", "cloud-pw")
    commands += provision_commands(A, "secret-a") + provision_commands(B, "secret-b")
    assert [r for r in execute(state, *commands) if "error" in r] == []
    return state


@pytest.fixture(scope="module", autouse=True)
def quick_hashes() -> Iterator[None]:
    """New password hashes of one iteration: these tests are about logic, not hashing cost."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynsec_state, "HASH_ITERATIONS", 1)
        yield


@pytest.fixture(scope="module")
def state(quick_hashes: None) -> DynamicSecurity:
    return fleet()


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a//c", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+", "a/b", False),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("diredi/v1/#", "diredi/v1/dev/cam-a/status", True),
        ("diredi/v1/dev/cam-a/status", "diredi/v1/dev/cam-b/status", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


@pytest.mark.parametrize(
    ("pattern", "topic_filter", "expected"),
    [
        ("diredi/v1/#", "diredi/v1/dev/+/status", True),
        ("diredi/v1/#", "diredi/v1/#", True),
        ("diredi/v1/#", "diredi/v1", True),
        ("diredi/v1/#", "diredi/#", False),
        ("diredi/v1/#", "#", False),
        ("diredi/v1/#", "+/v1/dev/x/status", False),
        ("a/+", "a/+", True),
        ("a/+", "a/b", True),
        ("a/+", "a/#", False),
        ("a/b", "a/+", False),
        ("a/b", "a/b/c", False),
        ("+/+", "a/b", True),
        ("#", "$SYS/#", False),
        ("$CONTROL/dynamic-security/#", RESPONSE_TOPIC, True),
    ],
)
def test_filter_covered(pattern: str, topic_filter: str, expected: bool) -> None:
    assert filter_covered(pattern, topic_filter) is expected


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("a/#", True),
        ("+", True),
        ("a/+/b", True),
        ("a/#/b", False),
        ("a#", False),
        ("a/b+", False),
        ("", False),
    ],
)
def test_valid_filter(topic_filter: str, expected: bool) -> None:
    assert valid_filter(topic_filter) is expected


@pytest.mark.parametrize("kind", DEVICE_PUBLISHES)
def test_a_device_publishes_only_its_own_reports(state: DynamicSecurity, kind: MessageKind) -> None:
    assert state.may_publish(A, device_topic(A, kind))
    assert not state.may_publish(A, device_topic(B, kind))
    assert not state.may_subscribe(A, device_topic(A, kind))


@pytest.mark.parametrize("kind", DEVICE_SUBSCRIBES)
def test_a_device_subscribes_only_to_its_own_commands_exactly(
    state: DynamicSecurity, kind: MessageKind
) -> None:
    own = device_topic(A, kind)
    assert state.may_subscribe(A, own)
    assert not state.may_subscribe(A, device_topic(B, kind))
    assert not state.may_subscribe(A, own.rsplit("/", 1)[0] + "/+")
    assert not state.may_publish(A, own)


@pytest.mark.parametrize(
    "topic_filter", ["#", "$SYS/#", "+/+", "diredi/#", "diredi/v1/dev/+/status", f"diredi/v1/dev/{A}/#"]
)
def test_a_device_cannot_subscribe_wide(state: DynamicSecurity, topic_filter: str) -> None:
    assert not state.may_subscribe(A, topic_filter)


def test_the_cloud_has_everything_under_diredi_v1_and_nothing_else(state: DynamicSecurity) -> None:
    assert state.may_subscribe("cloud", "diredi/v1/dev/+/status")
    assert state.may_publish("cloud", device_topic(A, MessageKind.CMD))
    assert not state.may_subscribe("cloud", "#")
    assert not state.may_publish("cloud", CONTROL_TOPIC)


def test_only_the_admin_has_the_control_topic(state: DynamicSecurity) -> None:
    assert state.may_publish("admin", CONTROL_TOPIC)
    assert state.may_subscribe("admin", RESPONSE_TOPIC)
    assert not state.may_publish(A, CONTROL_TOPIC)
    assert not state.may_subscribe(A, RESPONSE_TOPIC)
    assert not state.may_subscribe("admin", "diredi/v1/#")


def test_unsubscribe_acls() -> None:
    # Prepare
    state = fleet()
    acls = [{"acltype": "unsubscribeLiteral", "topic": "pinned/topic", "allow": False}]
    execute(state, {"command": "createRole", "rolename": "pinned", "acls": acls})
    execute(state, {"command": "addClientRole", "username": B, "rolename": "pinned"})

    # Execute, Assert
    assert state.may_unsubscribe(A, device_topic(A, MessageKind.CMD))
    assert not state.may_unsubscribe(B, "pinned/topic")
    assert state.may_unsubscribe(B, "pinned/#")  # literal: the exact filter only


def test_unknown_and_anonymous_users_get_the_default(state: DynamicSecurity) -> None:
    assert not state.may_publish("nobody", device_topic(A, MessageKind.STATUS))
    assert not state.may_subscribe(None, "#")
    assert not state.may_receive(None, "x")  # receiving, too, needs a role that allows it
    assert state.may_receive(A, device_topic(A, MessageKind.CMD))
    assert not state.may_receive(A, device_topic(B, MessageKind.CMD))  # even through an inherited session


def test_the_role_of_higher_priority_decides_first() -> None:
    # Prepare
    state = fleet()
    deny = {"acltype": "publishClientSend", "topic": "diredi/v1/#", "allow": False}
    execute(state, {"command": "createRole", "rolename": "mute", "acls": [deny]})

    # Execute
    low = execute(state, {"command": "addClientRole", "username": A, "rolename": "mute", "priority": -5})
    allowed_below = state.may_publish(A, device_topic(A, MessageKind.STATUS))
    execute(state, {"command": "removeClientRole", "username": A, "rolename": "mute"})
    execute(state, {"command": "addClientRole", "username": A, "rolename": "mute", "priority": 5})

    # Assert
    assert low == [{"command": "addClientRole"}]
    assert allowed_below
    assert not state.may_publish(A, device_topic(A, MessageKind.STATUS))


def test_within_a_role_the_acl_of_higher_priority_and_literal_before_pattern() -> None:
    # Prepare
    state = fleet()
    acls = [
        {"acltype": "publishClientSend", "topic": "x/#", "priority": 1, "allow": True},
        {"acltype": "publishClientSend", "topic": "x/secret", "priority": 9, "allow": False},
        {"acltype": "subscribePattern", "topic": "y/#", "priority": 9, "allow": False},
        {"acltype": "subscribeLiteral", "topic": "y/open", "allow": True},
    ]

    # Execute
    execute(
        state,
        {"command": "createRole", "rolename": "mixed", "acls": acls},
        {"command": "addClientRole", "username": A, "rolename": "mixed", "priority": 10},
    )

    # Assert
    assert state.may_publish(A, "x/public")
    assert not state.may_publish(A, "x/secret")
    assert state.may_subscribe(A, "y/open")
    assert not state.may_subscribe(A, "y/other")


def test_default_access_can_be_changed() -> None:
    # Prepare
    state = fleet()

    # Execute
    allow = [{"acltype": "publishClientSend", "allow": True}]
    response = execute(state, {"command": "setDefaultACLAccess", "acls": allow})

    # Assert
    assert response == [{"command": "setDefaultACLAccess"}]
    assert state.may_publish("nobody", "anything")
    assert not state.may_subscribe("nobody", "anything")


@pytest.mark.parametrize(
    ("username", "client_id", "expected"),
    [
        (A, A, Client),
        (A, B, NOT_AUTHORIZED),
        (A, "", IDENTIFIER_REJECTED),
        ("nobody", "nobody", NOT_AUTHORIZED),
        (None, "anonymous", NOT_AUTHORIZED),
        ("cloud", "any-client-id", Client),
    ],
)
def test_login_checks_the_username_and_bound_client_id(
    state: DynamicSecurity, username: str | None, client_id: str, expected: object
) -> None:
    # Execute
    found = state.login(username, client_id)

    # Assert
    assert isinstance(found, Client) if expected is Client else found == expected


@pytest.mark.parametrize(
    ("username", "password", "expected"),
    [(A, "secret-a", True), (A, "secret-b", False), (A, None, False), ("nobody", "secret-a", False)],
)
def test_verify_password(state: DynamicSecurity, username: str, password: str | None, expected: bool) -> None:
    assert state.verify_password(state.login(username, username), password) is expected


def test_a_disabled_client_cannot_log_in_and_is_kicked() -> None:
    # Prepare
    state = fleet()

    # Execute
    outcome = state.execute(json.dumps({"commands": [{"command": "disableClient", "username": A}]}).encode())

    # Assert
    assert outcome.kick == {A} and outcome.changed
    assert state.login(A, A) == NOT_AUTHORIZED
    assert not state.still_valid(state.clients[A], state.clients[A].password)
    execute(state, {"command": "enableClient", "username": A})
    assert isinstance(state.login(A, A), Client)


def test_revoke_deletes_the_client_and_role_and_kicks_it() -> None:
    # Prepare
    state = fleet()

    # Execute
    outcome = state.execute(json.dumps({"commands": revoke_commands(A)}).encode())

    # Assert
    assert outcome.response == {"responses": [{"command": "deleteClient"}, {"command": "deleteRole"}]}
    assert outcome.kick == {A}
    assert state.login(A, A) == NOT_AUTHORIZED
    assert not state.may_publish(A, device_topic(A, MessageKind.STATUS))


def test_set_client_password() -> None:
    # Prepare
    state = fleet()
    before = state.clients[A].password

    # Execute
    execute(state, {"command": "setClientPassword", "username": A, "password": "rotated"})

    # Assert
    client = state.login(A, A)
    assert state.verify_password(client, "rotated") and not state.verify_password(client, "secret-a")
    assert isinstance(client, Client) and not state.still_valid(client, before)  # a login racing it fails


def test_get_and_list_clients_never_show_a_password() -> None:
    # Prepare
    state = fleet()

    # Execute
    got, listed, verbose = execute(
        state,
        {"command": "getClient", "username": A},
        {"command": "listClients", "count": 2, "offset": 1},
        {"command": "listClients", "verbose": True},
    )

    # Assert
    assert got["data"]["client"] == {
        "username": A,
        "clientid": A,
        "roles": [{"rolename": f"device-{A}", "priority": 0}],
        "groups": [],
        "disabled": False,
    }
    assert listed["data"] == {"totalCount": 4, "clients": ["cloud", A]}
    assert "secret" not in json.dumps(verbose) and "salt" not in json.dumps(verbose)


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (provision_commands(A, "again")[1], "Client already exists"),
        (provision_commands(A, "again")[0], "Role already exists"),
        ({"command": "deleteClient", "username": "nobody"}, "Client not found"),
        ({"command": "deleteRole", "rolename": "nobody"}, "Role not found"),
        ({"command": "getClient", "username": "nobody"}, "Client not found"),
        ({"command": "disableClient", "username": "nobody"}, "Client not found"),
        (add_role("nobody"), "Role not found"),
        (add_role(f"device-{A}"), "Client is already in this role"),
        ({"command": "removeClientRole", "username": "nobody", "rolename": "admin"}, "Client not found"),
        ({"command": "createClient", "username": "x", "roles": [{"rolename": "nobody"}]}, "Role not found"),
        ({"command": "createClient", "password": "x"}, "Invalid/missing username"),
        ({"command": "createClient", "username": 5}, "Invalid/missing username"),
        ({"command": "createClient", "username": "\ud800"}, "Invalid/missing username"),
        ({"command": "createClient", "username": "x", "roles": "admin"}, "Invalid/missing roles"),
        ({"command": "setClientPassword", "username": A}, "Invalid/missing password"),
        (create_role({"acltype": "nope", "topic": "a"}), "Invalid acltype"),
        (create_role({"acltype": "subscribePattern", "topic": "a/#/b"}), "Invalid/missing topic"),
        (create_role({"acltype": "subscribePattern", "topic": "a", "priority": "high"}), "Invalid priority"),
        (
            create_role(*[{"acltype": "subscribePattern", "topic": "a"}] * 2),
            "ACL with this topic already exists",
        ),
        ({"command": "createRole", "rolename": "r", "acls": {"x": 1}}, "Invalid/missing acls"),
        (
            {"command": "setDefaultACLAccess", "acls": [{"acltype": "publishClientSend", "allow": "yes"}]},
            "Invalid/missing allow",
        ),
        ({"command": "listClients", "count": "all"}, "Invalid count"),
        ({"command": "modifyClient", "username": A}, "Unknown command"),
    ],
)
def test_a_command_that_cannot_run_gets_its_error(command: dict[str, Any], error: str) -> None:
    # Prepare
    state = fleet()
    before = json.dumps(state.to_json(), sort_keys=True)

    # Execute
    outcome = state.execute(json.dumps({"commands": [command]}).encode())

    # Assert
    assert outcome.response == {"responses": [{"command": command["command"], "error": error}]}
    assert not outcome.changed and not outcome.kick
    assert json.dumps(state.to_json(), sort_keys=True) == before


@pytest.mark.parametrize(
    ("payload", "response"),
    [
        (b"not json", {"command": "Unknown command", "error": "Payload not valid JSON"}),
        (b"\xff\xfe", {"command": "Unknown command", "error": "Payload not valid JSON"}),
        (b"[]", {"command": "Unknown command", "error": "Invalid/missing commands"}),
        (b'{"commands": 5}', {"command": "Unknown command", "error": "Invalid/missing commands"}),
        (b'{"commands": [5]}', {"command": "Unknown command", "error": "Command not an object"}),
        (
            b'{"commands": [{"command": 5}]}',
            {"command": "Unknown command", "error": "Invalid/missing command"},
        ),
        (
            b'{"commands": [{"command": "listClients", "correlationData": 5}]}',
            {"command": "listClients", "error": "Invalid correlationData data type"},
        ),
    ],
)
def test_garbage_gets_an_error_response(payload: bytes, response: dict[str, Any]) -> None:
    assert fleet().execute(payload).response == {"responses": [response]}


def test_responses_follow_the_commands_in_order_with_their_correlation_data() -> None:
    # Prepare
    state = fleet()
    commands = [
        {"command": "deleteClient", "username": "nobody", "correlationData": "1"},
        {"command": "createClient", "username": "x", "password": "pw", "correlationData": "2"},
        {"command": "getClient", "username": "x"},
    ]

    # Execute
    responses = execute(state, *commands)

    # Assert
    assert [r["command"] for r in responses] == ["deleteClient", "createClient", "getClient"]
    assert responses[0] == {"command": "deleteClient", "error": "Client not found", "correlationData": "1"}
    assert responses[1] == {"command": "createClient", "correlationData": "2"}
    assert responses[2]["data"]["client"]["username"] == "x"


def test_the_state_document_round_trips_without_any_password() -> None:
    # Prepare
    state = fleet()

    # Execute
    document = json.loads(json.dumps(state.to_json()))
    again = DynamicSecurity.from_json(document)

    # Assert
    assert again.to_json() == document
    assert "secret-a" not in json.dumps(document) and "admin-pw" not in json.dumps(document)
    assert again.verify_password(again.login(A, A), "secret-a")
    assert again.may_subscribe(A, device_topic(A, MessageKind.CMD))
    assert not again.may_subscribe(A, "#")


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"defaultACLAccess": {}, "clients": [], "roles": [{"rolename": "r", "acls": [{"acltype": "x"}]}]},
        {"defaultACLAccess": {}, "roles": [], "clients": [{"username": "u", "roles": [{"rolename": "r"}]}]},
        {"defaultACLAccess": {}, "roles": [], "clients": [{"username": "u", "password": "x", "salt": "y"}]},
    ],
)
def test_a_broken_state_document_is_refused(document: dict[str, Any]) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        DynamicSecurity.from_json(document)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["username", "password", "clientid", "rolename", "roles", "acls", "priority", "count"]
)
COMMAND = st.fixed_dictionaries(
    {"command": st.sampled_from(["createClient", "createRole", "addClientRole", "listClients", "x"])},
    optional={"correlationData": JSON},
).flatmap(lambda base: st.dictionaries(FIELDS, JSON, max_size=4).map(lambda extra: base | extra))


@settings(max_examples=100, deadline=None)
@given(commands=st.lists(COMMAND | JSON, max_size=4))
def test_any_commands_get_one_response_each_and_never_raise(commands: list[Any]) -> None:
    # Prepare
    state = DynamicSecurity.initial("admin", "admin-pw")

    # Execute
    outcome = state.execute(json.dumps({"commands": commands}).encode())

    # Assert
    assert len(outcome.response["responses"]) == len(commands)
    DynamicSecurity.from_json(json.loads(json.dumps(state.to_json())))  # still a valid state
