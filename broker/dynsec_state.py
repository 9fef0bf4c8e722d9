"""The pieces of mosquitto's dynamic-security state as the embedded broker keeps them: ACL types and
the default access, topic filters and how an ACL matches them, PBKDF2 password hashes, clients, roles,
what a control message did, and the CONNECT fields a login is checked on. Pure: no I/O
(`embedded_acl.DynamicSecurity` holds and checks them)."""

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
ACCEPTED, UNACCEPTABLE_PROTOCOL, IDENTIFIER_REJECTED, NOT_AUTHORIZED = 0, 1, 2, 5


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


# --- A CONNECT, as the login reads it ---------------------------------------------------------------


class _Fields:
    """A cursor over a packet: bytes, and length-prefixed binary data or UTF-8 strings (MQTT §1.5.3)."""

    def __init__(self, data: bytes, at: int) -> None:
        self.data, self.at = data, at

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("the CONNECT packet ends early")
        self.at += n
        return self.data[self.at - n : self.at]

    def binary(self) -> bytes:
        return self.take(int.from_bytes(self.take(2), "big"))

    def text(self) -> str:
        return self.binary().decode()  # a UnicodeDecodeError is a ValueError


@dataclass(frozen=True)
class Hello:
    """What a login is checked on, read from a CONNECT packet (MQTT 3.1.1 §3.1)."""

    level: int  # the protocol level, 4 for 3.1.1; of another level nothing more is read
    client_id: str = ""
    clean_session: bool = True
    keepalive: int = 0
    will_topic: str | None = None
    will_retain: bool = False
    username: str | None = None
    password: str | None = None  # its bytes as sent (surrogate escapes), which the hash takes back

    @classmethod
    def parse(cls, packet: bytes) -> Hello:
        """Read a whole CONNECT packet, fixed header included; ValueError if it is not a valid one."""
        if packet[:1] != b"\x10":
            raise ValueError("the first packet is not a CONNECT")
        fields = _Fields(packet, 1)
        while fields.take(1)[0] & 0x80:  # the remaining length
            pass
        if fields.text() != "MQTT":
            raise ValueError("not MQTT 3.1.1")
        level, flags = fields.take(2)
        keepalive = int.from_bytes(fields.take(2), "big")
        if level != 4:
            return cls(level)
        if flags & 0x01 or flags & 0x18 == 0x18:
            raise ValueError("a reserved flag or a will QoS of 3 in CONNECT")
        client_id = fields.text()
        will_topic = None
        if flags & 0x04:
            will_topic = fields.text()
            fields.binary()  # the will's message
        username = fields.text() if flags & 0x80 else None
        password = fields.binary().decode(errors="surrogateescape") if flags & 0x40 else None
        clean, will_retain = bool(flags & 0x02), bool(flags & 0x20)
        return cls(level, client_id, clean, keepalive, will_topic, will_retain, username, password)
