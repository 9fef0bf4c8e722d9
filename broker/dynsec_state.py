"""The pieces of mosquitto's dynamic-security state as the embedded broker keeps them: ACL types and
the default access, topic filters and how an ACL matches them, PBKDF2 password hashes, clients, roles,
and what a control message did. Pure: no I/O (`embedded_acl.DynamicSecurity` holds and checks them)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from broker.acl import CONTROL_TOPIC

PUBLISH_SEND = "publishClientSend"
PUBLISH_RECEIVE = "publishClientReceive"
SUBSCRIBE_LITERAL, SUBSCRIBE_PATTERN = "subscribeLiteral", "subscribePattern"
UNSUBSCRIBE_LITERAL, UNSUBSCRIBE_PATTERN = "unsubscribeLiteral", "unsubscribePattern"
ACL_TYPES = {PUBLISH_SEND, PUBLISH_RECEIVE, SUBSCRIBE_LITERAL, SUBSCRIBE_PATTERN}
ACL_TYPES |= {UNSUBSCRIBE_LITERAL, UNSUBSCRIBE_PATTERN}
# `mosquitto_ctrl dynsec init`'s defaults: deny publishing and subscribing unless a role allows it.
DEFAULT_ACCESS = {PUBLISH_SEND: False, PUBLISH_RECEIVE: True, "subscribe": False, "unsubscribe": True}

ADMIN_ROLE = "admin"
CONTROL_FILTER = CONTROL_TOPIC.rsplit("/", 1)[0] + "/#"  # $CONTROL/dynamic-security/#
# The admin may use the control API and nothing else (mosquitto's init also lets it read every topic).
ADMIN_ACLS = [
    {"acltype": acltype, "topic": CONTROL_FILTER, "priority": 0, "allow": True}
    for acltype in (PUBLISH_SEND, PUBLISH_RECEIVE, SUBSCRIBE_PATTERN, UNSUBSCRIBE_PATTERN)
]

# PBKDF2-SHA512 like dynsec (64-byte hash, 12-byte salt); the iteration count is stored with each hash.
HASH_ITERATIONS = 10_000
_SALT_BYTES = 12

# CONNACK return codes of MQTT 3.1.1 (what mosquitto answers a refused login with).
ACCEPTED, IDENTIFIER_REJECTED, NOT_AUTHORIZED = 0, 2, 5


# --- Topic matching ---------------------------------------------------------------------------------


def _hides_dollar(pattern: str, topic: str) -> bool:
    """A leading wildcard never matches a `$` topic (MQTT 4.7.2): `#` does not cover `$SYS/#`."""
    return topic.startswith("$") and pattern[:1] in ("+", "#")


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether topic name `topic` matches filter `pattern` (`+` one level, `#` the rest, itself included)."""
    if _hides_dollar(pattern, topic):
        return False
    levels = topic.split("/")
    for i, level in enumerate(pattern.split("/")):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(levels) == pattern.count("/") + 1


def filter_covered(pattern: str, topic_filter: str) -> bool:
    """Whether every topic that `topic_filter` can match is matched by `pattern` (a subscribePattern
    ACL `diredi/v1/#` covers the subscription `diredi/v1/dev/+/status`, not `diredi/#`)."""
    if _hides_dollar(pattern, topic_filter):
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(pattern.split("/")):
        if level == "#":
            return True
        if i >= len(levels) or levels[i] == "#":
            return False
        if level != "+" and levels[i] != level:  # a `+` in the filter is covered by `+` only
            return False
    return len(levels) == pattern.count("/") + 1


def literal_match(acl_topic: str, topic_filter: str) -> bool:
    """subscribeLiteral / unsubscribeLiteral: the filter must be the ACL's topic, character for character."""
    return acl_topic == topic_filter


def valid_filter(topic_filter: str) -> bool:
    """A topic filter MQTT accepts: not empty, `#` only as the whole last level, `+` only as a whole level."""
    if not is_utf8(topic_filter) or not topic_filter or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    return all(
        ("#" not in level or (level == "#" and i == len(levels) - 1)) and ("+" not in level or level == "+")
        for i, level in enumerate(levels)
    )


def is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate from JSON's \ud800
        return False
    return True


# --- Passwords --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasswordHash:
    """A PBKDF2-SHA512 password hash with its salt and iteration count (dynsec's fields)."""

    hash: bytes
    salt: bytes
    iterations: int

    @classmethod
    def make(cls, password: str) -> PasswordHash:
        salt, iterations = secrets.token_bytes(_SALT_BYTES), HASH_ITERATIONS
        return cls(_pbkdf2(password, salt, iterations), salt, iterations)

    def verify(self, password: str) -> bool:
        """Whether `password` is the one hashed (in constant time)."""
        return hmac.compare_digest(_pbkdf2(password, self.salt, self.iterations), self.hash)

    def to_json(self) -> dict[str, Any]:
        encode = base64.b64encode
        return {
            "password": encode(self.hash).decode(),
            "salt": encode(self.salt).decode(),
            "iterations": self.iterations,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PasswordHash:
        iterations = data["iterations"]
        if type(iterations) is not int or iterations < 1:
            raise ValueError("bad iteration count")
        return cls(base64.b64decode(data["password"]), base64.b64decode(data["salt"]), iterations)


def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha512", password.encode(errors="surrogateescape"), salt, iterations)


# A hash to spend the same time on when the username is unknown (no timing oracle for usernames).
DECOY_HASH = PasswordHash.make(secrets.token_urlsafe(16))


# --- The model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acl:
    acltype: str
    topic: str
    priority: int
    allow: bool

    def to_json(self) -> dict[str, Any]:
        return {"acltype": self.acltype, "topic": self.topic, "priority": self.priority, "allow": self.allow}


@dataclass
class Role:
    name: str
    acls: list[Acl]

    def to_json(self) -> dict[str, Any]:
        return {"rolename": self.name, "acls": [acl.to_json() for acl in self.acls]}


@dataclass
class Client:
    username: str
    password: PasswordHash | None
    clientid: str | None = None
    roles: dict[str, int] = field(default_factory=dict)  # role name -> priority
    disabled: bool = False

    def to_json(self, *, secret: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"username": self.username}
        if self.clientid is not None:
            data["clientid"] = self.clientid
        if secret and self.password is not None:
            data |= self.password.to_json()
        data["roles"] = [{"rolename": name, "priority": p} for name, p in self.roles.items()]
        if not secret:
            data["groups"] = []
        data["disabled"] = self.disabled
        return data


@dataclass
class Outcome:
    """What one control message did: the response to publish, the usernames whose live sessions must
    end, and whether the state changed (and must be saved)."""

    response: dict[str, Any]
    kick: set[str] = field(default_factory=set)
    changed: bool = False
