"""deploy/emqx and deploy/vernemq grant exactly what mosquitto's rules grant (broker/acl.py): the shipped
ACL files are read and applied here the way each broker applies them (EMQX 5's file authorizer,
VerneMQ's vmq_acl; see the READMEs for the source and pages they were checked against), and compared
with the device pattern ACL and the cloud role for two devices and two service accounts, topic by
topic. Change broker/acl.py or wire/topics.py and these fail until the other brokers' rules follow.

No EMQX or VerneMQ runs here: the configuration files are checked for the settings the rules rely on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal, TypeAlias

import pytest

from broker.acl import cloud_acls, device_pattern_acl, service_account_commands
from broker.dynsec_state import filter_covered, topic_matches
from wire.topics import CLOUD_TOPICS, TRUST_TOPIC, MessageKind, device_filter, device_topic

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
Action = Literal["publish", "subscribe"]
DEVICES = ("cam-a01", "cam-b02")
OTHER_DEVICE = "cam-c03"  # never connects: its topics must stay out of everyone's reach but the cloud's
SERVICES = ("diredi-ingest-a", "diredi-worker-1")  # the accounts deploy/vernemq/vmq.acl has blocks for
GROUPS = ("diredi-ingest", "g")  # the ingest's default shared-subscription group, and another


@dataclass(frozen=True)
class Client:
    """Who a broker sees: on both brokers' configurations the client id is the username."""

    username: str

    @property
    def clientid(self) -> str:
        return self.username


# --- The probes -----------------------------------------------------------------------------------


def topic_names() -> list[str]:
    """Topics a client might publish to."""
    names = [device_topic(d, kind) for d in (*DEVICES, OTHER_DEVICE) for kind in MessageKind]
    a = DEVICES[0]
    names += [TRUST_TOPIC, "diredi/v1/other", f"diredi/v1/dev/{a}", f"diredi/v1/dev/{a}/model"]
    names += [f"diredi/v1/dev/{a}/status/more", f"diredi/v2/dev/{a}/status", "status"]
    return [*names, "$SYS/broker/uptime", "$CONTROL/dynamic-security/v1"]


def topic_filters() -> list[str]:
    """Filters a client might subscribe to (no shared subscriptions)."""
    filters = [*topic_names(), "#", "+/#", "diredi/#", CLOUD_TOPICS, "diredi/v1/+", "diredi/v1/dev/#"]
    filters += ["$SYS/#", "$CONTROL/#", *(device_filter(kind) for kind in MessageKind)]
    for d in DEVICES:
        filters += [f"diredi/v1/dev/{d}/#", f"diredi/v1/dev/{d}/+", f"diredi/v1/dev/{d}/model/+"]
    return filters


def shared_filters() -> list[str]:
    """The same filters as MQTT 5 shared subscriptions."""
    return [f"$share/{group}/{f}" for group in GROUPS for f in topic_filters()]


def unshared(topic_filter: str) -> str:
    """The filter a shared subscription `$share/<group>/<filter>` subscribes to."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


# --- mosquitto: what broker/acl.py grants ------------------------------------------------------------


def mosquitto_device_allows(device_id: str, action: Action, topic: str) -> bool:
    """broker/acl.py's device pattern ACL for the device whose certificate names `device_id`: a publish
    is allowed on a `pattern write` topic; a subscription is read as mosquitto's read grant (and as
    dynamic security's per-device roles have it): every topic it can match must be readable."""
    access = "write" if action == "publish" else "read"
    patterns = []
    for line in device_pattern_acl().splitlines():
        if line.startswith("#"):
            continue
        keyword, line_access, pattern = line.split(" ", 2)
        assert keyword == "pattern", line  # the certificate listener's ACL has patterns only
        if line_access == access:
            patterns.append(pattern.replace("%u", device_id).replace("%c", device_id))
    if action == "publish":
        return any(topic_matches(p, topic) for p in patterns)
    return any(filter_covered(p, topic) for p in patterns)


def cloud_role_allows(action: Action, topic: str) -> bool:
    """The services' role in dynamic security (broker/acl.py cloud_acls)."""
    for acl in cloud_acls():
        assert acl["allow"], acl  # the role only allows; the default access denies the rest
        kind, pattern = acl["acltype"], acl["topic"]
        if action == "publish" and kind == "publishClientSend" and topic_matches(pattern, topic):
            return True
        if action == "subscribe" and kind == "subscribePattern" and filter_covered(pattern, topic):
            return True
        if action == "subscribe" and kind == "subscribeLiteral" and pattern == topic:
            return True
    return False


# --- EMQX 5: acl.conf (Erlang terms) and the file authorizer's matching ------------------------------


@dataclass(frozen=True)
class Atom:
    name: str


Term: TypeAlias = "Atom | str | int | tuple[Term, ...] | list[Term]"
_TOKENS = re.compile(
    r"""(?P<skip>\s+|%[^\n]*)|(?P<string>"(?:[^"\\]|\\.)*")|(?P<quoted>'[^'\\]*')
    |(?P<atom>[a-z][A-Za-z0-9_@]*)|(?P<int>\d+)|(?P<punct>[{}\[\],.])""",
    re.VERBOSE,
)


def erlang_terms(text: str) -> list[Term]:
    """The terms of a file of Erlang terms, each ended by a dot (what `file:consult/1` reads)."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = _TOKENS.match(text, position)
        if match is None:
            raise ValueError(f"cannot read Erlang terms at {text[position : position + 40]!r}")
        position = match.end()
        kind = match.lastgroup or ""
        if kind != "skip":
            tokens.append((kind, match.group()))
    terms: list[Term] = []
    index = 0

    def term() -> Term:
        nonlocal index
        kind, value = tokens[index]
        index += 1
        if kind == "string":
            return re.sub(r"\\(.)", r"\1", value[1:-1])
        if kind in ("atom", "quoted"):
            return Atom(value.strip("'"))
        if kind == "int":
            return int(value)
        if value in "{[":
            items: list[Term] = []
            close = "}" if value == "{" else "]"
            while tokens[index][1] != close:
                items.append(term())
                if tokens[index][1] == ",":
                    index += 1
            index += 1
            return tuple(items) if close == "}" else items
        raise ValueError(f"unexpected {value!r} in Erlang terms")

    while index < len(tokens):
        terms.append(term())
        assert tokens[index][1] == ".", f"a term must end with a dot, not {tokens[index][1]!r}"
        index += 1
    return terms


@dataclass(frozen=True)
class EmqxRule:
    allow: bool
    who: Term
    action: str  # publish | subscribe | all
    topics: list[Term] | None  # None: every topic


@cache
def emqx_rules() -> list[EmqxRule]:
    """deploy/emqx/acl.conf, in order."""
    rules = []
    for term in erlang_terms((DEPLOY / "emqx" / "acl.conf").read_text()):
        assert isinstance(term, tuple) and term[0] in (Atom("allow"), Atom("deny")), term
        if term[1:] == (Atom("all"),):
            rules.append(EmqxRule(term[0] == Atom("allow"), Atom("all"), "all", None))
            continue
        _, who, action, topics = term
        assert action in (Atom("publish"), Atom("subscribe"), Atom("all")), f"unsupported action {action}"
        assert isinstance(topics, list), term
        assert isinstance(action, Atom)
        rules.append(EmqxRule(term[0] == Atom("allow"), who, action.name, topics))
    return rules


def emqx_who(who: Term, client: Client) -> bool:
    """Whether a rule's client condition (`all`, `{username|clientid, Name | {re, Regex}}`,
    `{'and'|'or', [...]}`) holds for `client`."""
    if who == Atom("all"):
        return True
    assert isinstance(who, tuple) and len(who) == 2, f"unsupported who {who}"
    key, value = who
    if key in (Atom("and"), Atom("or")):
        assert isinstance(value, list)
        results = [emqx_who(w, client) for w in value]
        return all(results) if key == Atom("and") else any(results)
    if key in (Atom("username"), Atom("user")):
        name = client.username
    elif key in (Atom("clientid"), Atom("client")):
        name = client.clientid
    else:
        raise AssertionError(f"unsupported who {who}")
    if isinstance(value, tuple) and value[0] == Atom("re") and isinstance(value[1], str):
        return re.search(value[1], name) is not None  # Erlang's re:run: a search, not a full match
    assert isinstance(value, str), f"unsupported who {who}"
    return name == value


def emqx_match(name: list[str], topic_filter: list[str]) -> bool:
    """emqx_topic:match/2 on words: a wildcard never matches a first `$` level."""
    if name and name[0].startswith("$") and topic_filter and topic_filter[0] in ("+", "#"):
        return False
    while name and topic_filter and (name[0] == topic_filter[0] or topic_filter[0] == "+"):
        name, topic_filter = name[1:], topic_filter[1:]
    return (not name and not topic_filter) or topic_filter == ["#"]


def emqx_topic_matches(topic: str, rule_topic: Term, client: Client) -> bool:
    """A rule's topic against a publish topic or a subscription's filter: `{eq, T}` is equality,
    else the placeholders are rendered and the result matched as a filter."""
    if isinstance(rule_topic, tuple) and rule_topic[0] == Atom("eq") and isinstance(rule_topic[1], str):
        return topic.split("/") == rule_topic[1].split("/")
    assert isinstance(rule_topic, str), f"unsupported topic {rule_topic}"
    rendered = rule_topic.replace("${username}", client.username).replace("${clientid}", client.clientid)
    if "${" in rendered:  # a placeholder this client has no value for: the rule does not apply
        return False
    return emqx_match(topic.split("/"), rendered.split("/"))


def emqx_allows(client: Client, action: Action, topic: str) -> bool:
    """The file authorizer: first matching rule decides; none matching is `no_match = deny`. A shared
    subscription is authorized on its real filter (emqx_channel's check_sub_authzs)."""
    if action == "subscribe":
        topic = unshared(topic)
    for rule in emqx_rules():
        if rule.action not in (action, "all") or not emqx_who(rule.who, client):
            continue
        if rule.topics is None or any(emqx_topic_matches(topic, t, client) for t in rule.topics):
            return rule.allow
    return False


# --- VerneMQ: vmq.acl and vmq_acl's matching -----------------------------------------------------------


@dataclass
class VmqAcl:
    everyone: dict[str, list[str]] = field(default_factory=lambda: {"read": [], "write": []})
    users: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    patterns: dict[str, list[str]] = field(default_factory=lambda: {"read": [], "write": []})


@cache
def vmq_acl() -> VmqAcl:
    """deploy/vernemq/vmq.acl as vmq_acl reads it; refuses what its parser would choke on or
    misread (its documentation: no empty lines, no trailing spaces, a newline at the end)."""
    text = (DEPLOY / "vernemq" / "vmq.acl").read_text()
    assert text.endswith("\n"), "vmq.acl must end with a newline"
    acl, user = VmqAcl(), None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        assert line and line == line.rstrip(), f"vmq.acl line {number}: empty, or trailing spaces"
        if line.startswith("#"):
            continue
        if match := re.fullmatch(r"user (\S+)", line):
            user = match.group(1)
            acl.users.setdefault(user, {"read": [], "write": []})
            continue
        match = re.fullmatch(r"(topic|pattern)(?: (read|write))? (\S+)", line)
        assert match, f"vmq.acl line {number}: vmq_acl cannot read {line!r}"
        keyword, access, topic = match.groups()
        if keyword == "pattern":
            grants = acl.patterns
        else:
            grants = acl.everyone if user is None else acl.users[user]
        for each in [access] if access else ["read", "write"]:
            grants[each].append(topic)
    return acl


def vmq_match(topic: list[str], acl_topic: list[str]) -> bool:
    """vmq_topic:match/2: word by word, `+` one word, a last `#` the rest (no `$` exception)."""
    while topic and acl_topic and (topic[0] == acl_topic[0] or acl_topic[0] == "+"):
        topic, acl_topic = topic[1:], acl_topic[1:]
    return (not topic and not acl_topic) or acl_topic == ["#"]


def vmq_allows(client: Client, action: Action, topic: str) -> bool:
    """vmq_acl: write for publish, read for subscribe (the whole filter, `$share/<group>/` included),
    from the lines for everyone, then the client's user block, then the patterns (`%u`, `%c` stand
    for one whole level)."""
    access, words, acl = ("write" if action == "publish" else "read"), topic.split("/"), vmq_acl()
    grants = acl.everyone[access] + acl.users.get(client.username, {}).get(access, [])
    if any(vmq_match(words, t.split("/")) for t in grants):
        return True
    for pattern in acl.patterns[access]:
        levels = [{"%u": client.username, "%c": client.clientid}.get(w, w) for w in pattern.split("/")]
        if vmq_match(words, levels):
            return True
    return False


BROKERS = {"emqx": emqx_allows, "vernemq": vmq_allows}


# --- The rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_device_is_granted_exactly_what_the_mosquitto_pattern_acl_grants(broker: str, device: str) -> None:
    allows, client = BROKERS[broker], Client(device)
    probes: list[tuple[Action, str]] = [("publish", t) for t in topic_names()]
    probes += [("subscribe", f) for f in topic_filters()]

    differing = [
        (action, topic, expected)
        for action, topic in probes
        if allows(client, action, topic) != (expected := mosquitto_device_allows(device, action, topic))
    ]

    assert differing == [], f"{broker} differs from broker/acl.py (action, topic, mosquitto's answer)"
    assert sum(mosquitto_device_allows(device, a, t) for a, t in probes) >= len(MessageKind)  # not vacuous


@pytest.mark.parametrize("broker", BROKERS)
def test_nothing_a_device_is_granted_reaches_another_devices_topics(broker: str) -> None:
    allows, client = BROKERS[broker], Client(DEVICES[0])
    granted = [t for t in topic_names() if allows(client, "publish", t)]
    granted += [unshared(f) for f in topic_filters() + shared_filters() if allows(client, "subscribe", f)]

    others = [device_topic(d, kind) for d in (DEVICES[1], OTHER_DEVICE) for kind in MessageKind]
    reaching = [(g, t) for g in granted for t in others if topic_matches(g, t)]

    assert granted and reaching == []


@pytest.mark.parametrize("broker", BROKERS)
def test_a_device_cannot_join_the_ingests_shared_subscriptions(broker: str) -> None:
    allows = BROKERS[broker]
    for device in DEVICES:
        client = Client(device)
        ingest = [device_filter(kind, shared_group=g) for kind in MessageKind for g in GROUPS]
        assert not any(allows(client, "subscribe", f) for f in ingest)
        # Whatever shared subscription a broker lets through reaches only what the device may read.
        shared = [f for f in shared_filters() if allows(client, "subscribe", f)]
        assert all(mosquitto_device_allows(device, "subscribe", unshared(f)) for f in shared)


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_service_account_is_granted_what_the_cloud_role_grants(broker: str, service: str) -> None:
    allows, client = BROKERS[broker], Client(service)
    probes: list[tuple[Action, str]] = [("publish", t) for t in topic_names()]
    probes += [("subscribe", f) for f in topic_filters() + shared_filters()]

    differing = [
        (action, topic, expected)
        for action, topic in probes
        if allows(client, action, topic) != (expected := cloud_role_allows(action, topic))
    ]

    assert differing == [], f"{broker} differs from broker/acl.py cloud_acls (action, topic, mosquitto's)"
    ingest = [
        device_filter(MessageKind.PRESENCE),
        *(device_filter(k, shared_group=GROUPS[0]) for k in MessageKind),
    ]
    assert all(allows(client, "subscribe", f) for f in ingest)


def test_emqx_gives_the_services_rule_to_exactly_the_names_a_service_account_may_have() -> None:
    names = [*SERVICES, "diredi-cloud", "diredi-x", "diredi-" + "a" * 57, "diredi-" + "a" * 58, "diredi"]
    names += ["diredi-", "diredi_ingest", "Diredi-a", "diredi-a/b", "diredi-a+b", *DEVICES, "xdiredi-a"]
    only_services = device_topic(OTHER_DEVICE, MessageKind.MODEL_DESIRED)

    for name in names:
        try:
            service_account_commands(name, "secret")
            valid = True
        except ValueError:
            valid = False
        assert emqx_allows(Client(name), "publish", only_services) is valid, name


def test_emqx_acl_ends_by_denying_everything() -> None:
    assert emqx_rules()[-1] == EmqxRule(False, Atom("all"), "all", None)


def test_vernemq_user_blocks_are_the_service_accounts() -> None:
    blocks = set(vmq_acl().users)

    for name in blocks:
        service_account_commands(name, "secret")  # raises for a name no service account may have
    assert blocks == set(SERVICES)
    assert not any(vmq_acl().everyone.values()), "topic lines outside a user block apply to every client"


# --- The configurations the rules rely on ---------------------------------------------------------


def hocon_settings(text: str) -> dict[str, str]:
    """The `path.to.key = value` settings of a HOCON file written as deploy/emqx/emqx.conf is (one
    setting or block opening per line; an array may run over several lines)."""
    settings: dict[str, str] = {}
    prefix: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.split("##", 1)[0].strip()
        if not line:
            continue
        if line.count("[") > line.count("]"):
            pending = line + " "
            continue
        pending = ""
        if line == "}":
            prefix.pop()
        elif line.endswith("{"):
            prefix.append(line[:-1].strip())
        else:
            key, _, value = line.partition("=")
            settings[".".join([*prefix, key.strip()])] = value.strip().strip('"')
    assert not prefix and not pending, "unbalanced braces or brackets"
    return settings


def test_emqx_conf_sets_what_the_rules_rely_on() -> None:
    conf = hocon_settings((DEPLOY / "emqx" / "emqx.conf").read_text())
    devices, services = "listeners.ssl.devices", "listeners.ssl.services"

    expected = {
        f"{devices}.zone": "devices",
        "zones.devices.mqtt.peer_cert_as_username": "cn",
        "zones.devices.mqtt.peer_cert_as_clientid": "cn",
        f"{devices}.ssl_options.verify": "verify_peer",
        f"{devices}.ssl_options.fail_if_no_peer_cert": "true",
        f"{devices}.ssl_options.cacertfile": "/etc/emqx/diredi/fleet-ca.pem",
        f"{devices}.enable_authn": "false",
        f"{services}.zone": "services",
        "zones.services.mqtt.use_username_as_clientid": "true",
        f"{services}.enable_authn": "quick_deny_anonymous",
        "authorization.no_match": "deny",
        **{f"listeners.{kind}.default.enable": "false" for kind in ("tcp", "ssl", "ws", "wss")},
    }
    assert {key: conf.get(key) for key in expected} == expected
    assert re.fullmatch(
        r'\[\{type = file, enable = true, path = "[^"]+/acl.conf"\}\]', conf["authorization.sources"]
    )
    # Only the devices' listener faces the network: the services' one and the REST API are on loopback.
    binds = {key for key in conf if key.startswith("listeners.") and key.endswith(".bind")}
    assert binds == {f"{devices}.bind", f"{services}.bind"}
    assert conf[f"{services}.bind"].startswith("127.0.0.1:")
    assert conf["dashboard.listeners.http.bind"].startswith("127.0.0.1:")


def vernemq_settings() -> dict[str, str]:
    """deploy/vernemq/vernemq.conf's `key = value` lines (cuttlefish's format)."""
    settings = {}
    for line in (DEPLOY / "vernemq" / "vernemq.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" = ")
            assert key and value, line
            settings[key] = value
    return settings


def test_vernemq_conf_sets_what_the_rules_rely_on() -> None:
    conf = vernemq_settings()
    devices, services = "listener.ssl.devices", "listener.ssl.services"

    expected = {
        "allow_anonymous": "off",
        f"{devices}.require_certificate": "on",
        f"{devices}.use_identity_as_username": "on",
        f"{devices}.allow_anonymous_override": "off",
        f"{devices}.forward_connection_opts": "on",  # the identity script needs the listener's port
        f"{devices}.auth_plugins": "[vmq_diversity]",
        f"{devices}.authz_plugins": "[vmq_acl]",
        f"{services}.forward_connection_opts": "off",  # else vmq_passwd is never asked
        f"{services}.auth_plugins": "[vmq_diversity, vmq_passwd]",
        f"{services}.authz_plugins": "[vmq_acl]",
        "plugins.vmq_acl": "on",
        "plugins.vmq_passwd": "on",
        "plugins.vmq_diversity": "on",
    }
    assert {key: conf.get(key) for key in expected} == expected
    assert conf[services].startswith("127.0.0.1:")
    assert Path(conf["vmq_acl.acl_file"]).name == "vmq.acl"
    assert Path(conf["vmq_diversity.diredi_identity.file"]).name == "diredi_identity.lua"
    assert int(conf["crl_refresh_interval"]) > 0


def test_the_identity_script_guards_the_port_of_the_devices_listener() -> None:
    script = (DEPLOY / "vernemq" / "diredi_identity.lua").read_text()
    port = re.search(r"^DEVICE_LISTENER_PORT = (\d+)$", script, re.MULTILINE)

    assert port is not None
    assert vernemq_settings()["listener.ssl.devices"].rsplit(":", 1)[1] == port.group(1)
