"""Who may do what on the broker (DESIGN §2), as mosquitto dynamic-security commands.

Both brokers take the same commands on the same control topic: mosquitto's dynamic-security plugin,
and the embedded broker, which implements the subset used here. Every device gets a client whose
username and client id are its device id, and a role of its own that allows exactly its topics
(dynamic security has no `%u` substitution). Anything not allowed is denied.
"""

import re
from typing import Any

from wire.topics import (
    CLOUD_TOPICS,
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    SERVICE_ID_PREFIX,
    TRUST_TOPIC,
    device_pattern,
    device_topic,
    reserved_device_id,
)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
CLOUD_ROLE = "diredi-cloud"

Command = dict[str, Any]


def device_role(device_id: str) -> str:
    """The name of the role that holds one device's ACL."""
    return f"device-{device_id}"


def device_acls(device_id: str) -> list[Command]:
    """Publish to its own presence/status/knowledge/model-ack; subscribe (exactly, no wildcards) to its
    own model/desired, receipt and cmd and to the fleet's trust chain, and receive only those (the
    default denies receiving, so a session inherited by mistake delivers a device nothing else)."""
    publish = [
        {"acltype": "publishClientSend", "topic": device_topic(device_id, kind), "priority": 0, "allow": True}
        for kind in DEVICE_PUBLISHES
    ]
    subscribe = [
        {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}
        for topic in [*(device_topic(device_id, kind) for kind in DEVICE_SUBSCRIBES), TRUST_TOPIC]
        for acltype in ("subscribeLiteral", "unsubscribeLiteral", "publishClientReceive")
    ]
    return publish + subscribe


def cloud_acls() -> list[Command]:
    """The cloud's service account: everything under `diredi/v1/`, shared subscriptions included.

    mosquitto 2.0 checks a shared subscription's whole filter (`$share/<group>/diredi/v1/...`)
    against subscribe ACLs, so the shared form needs patterns of its own; messages it delivers are
    checked on their real topic (publishClientReceive)."""
    shared = f"$share/+/{CLOUD_TOPICS}"  # any ingest group
    return [
        {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}
        for acltype, topic in (
            ("publishClientSend", CLOUD_TOPICS),
            ("publishClientReceive", CLOUD_TOPICS),
            ("subscribePattern", CLOUD_TOPICS),
            ("unsubscribePattern", CLOUD_TOPICS),
            ("subscribePattern", shared),
            ("unsubscribePattern", shared),
        )
    ]


def provision_commands(device_id: str, secret: str) -> list[Command]:
    """Create the device's role and client (client id bound to the device id). Raises ValueError for an
    id in the services' namespace."""
    if (reason := reserved_device_id(device_id)) is not None:
        raise ValueError(reason)
    role = device_role(device_id)
    return [
        {"command": "createRole", "rolename": role, "acls": device_acls(device_id)},
        {
            "command": "createClient",
            "username": device_id,
            "password": secret,
            "clientid": device_id,
            "roles": [{"rolename": role, "priority": 0}],
        },
    ]


def revoke_commands(device_id: str) -> list[Command]:
    """Delete the device's client (which ends its live session) and its role."""
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": device_role(device_id)},
    ]


def default_access_commands() -> list[Command]:
    """Deny by default: a client may publish, subscribe or receive only where a role allows it."""
    return [
        {
            "command": "setDefaultACLAccess",
            "acls": [
                {"acltype": "publishClientSend", "allow": False},
                {"acltype": "publishClientReceive", "allow": False},
                {"acltype": "subscribe", "allow": False},
                {"acltype": "unsubscribe", "allow": True},
            ],
        }
    ]


def service_account_commands(name: str, password: str) -> list[Command]:
    """One cloud service's own account (an ingest's, a worker's): the cloud's role, and bound to the
    client id `name` (also its username), so it can neither take another client's session over nor be
    taken over. Raises ValueError for a name outside the services' namespace."""
    if not re.fullmatch(rf"{SERVICE_ID_PREFIX}-[A-Za-z0-9_-]{{1,57}}", name):
        raise ValueError(
            f"a service account's name is {SERVICE_ID_PREFIX}- and up to 57 letters, digits, - or _, "
            f"not {name[:70]!r}"
        )
    return [
        {"command": "createRole", "rolename": CLOUD_ROLE, "acls": cloud_acls()},
        {
            "command": "createClient",
            "username": name,
            "password": password,
            "clientid": name,
            "roles": [{"rolename": CLOUD_ROLE, "priority": 0}],
        },
    ]


def cloud_account_commands(username: str, password: str) -> list[Command]:
    """The cloud's service account (ingest, publisher) and its role."""
    return [
        {"command": "createRole", "rolename": CLOUD_ROLE, "acls": cloud_acls()},
        {
            "command": "createClient",
            "username": username,
            "password": password,
            "roles": [{"rolename": CLOUD_ROLE, "priority": 0}],
        },
    ]


def device_pattern_acl() -> str:
    """The ACL file of the certificate listener: every device's topics, for whichever device the
    certificate's CN (`%u`) names; nothing else (mosquitto denies what no line allows)."""
    lines = [
        "# Devices on the certificate listener: %u is the CN of their certificate, the device id.",
        "# Written by broker/mosquitto.py (render_config); see docs/certificate-identity.md.",
    ]
    lines += [f"pattern write {device_pattern(kind, '%u')}" for kind in DEVICE_PUBLISHES]
    lines += [f"pattern read {device_pattern(kind, '%u')}" for kind in DEVICE_SUBSCRIBES]
    lines.append(f"pattern read {TRUST_TOPIC}")  # a pattern: plain `topic` lines bind anonymous clients only
    return "\n".join(lines) + "\n"
