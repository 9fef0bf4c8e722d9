"""The embedded broker's dynamic-security model: clients, roles, default access, the control commands
that change them and the ACL checks, as mosquitto's dynamic-security plugin has them. Pure: no I/O.

The state is the plugin's JSON document (`to_json` / `from_json`: `defaultACLAccess`, `clients` with a
PBKDF2-SHA512 hash, salt and iteration count, never a password, and `roles` with their ACLs). ACLs are
checked like dynsec: the client's roles by priority (highest first), each role's ACLs of the asked type
by priority (highest first, subscribeLiteral before subscribePattern); the first that matches decides,
else the default access.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from broker.dynsec_state import (
    ACL_TYPES,
    ADMIN_ACLS,
    ADMIN_ROLE,
    DECOY_HASH,
    DEFAULT_ACCESS,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    PUBLISH_RECEIVE,
    PUBLISH_SEND,
    SUBSCRIBE_LITERAL,
    SUBSCRIBE_PATTERN,
    UNSUBSCRIBE_LITERAL,
    UNSUBSCRIBE_PATTERN,
    Acl,
    Client,
    Outcome,
    PasswordHash,
    Role,
    filter_covered,
    is_utf8,
    literal_match,
    topic_matches,
    valid_filter,
)
from broker.exceptions import CommandError


class DynamicSecurity:
    """Clients, roles and default access; `execute` runs a control message, the `may_*` methods check
    ACLs, `login` checks a CONNECT's username and client id."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.roles: dict[str, Role] = {}
        self.default_access = dict(DEFAULT_ACCESS)
        self._compiled: dict[str, list[dict[str, list[tuple[str, bool]]]]] = {}  # see _compiled_for

    @classmethod
    def initial(cls, admin_user: str, admin_password: str) -> DynamicSecurity:
        """A new state with only the admin client, like `mosquitto_ctrl dynsec init`."""
        state = cls()
        state.roles[ADMIN_ROLE] = Role(ADMIN_ROLE, [_acl(acl) for acl in ADMIN_ACLS])
        state.clients[admin_user] = Client(
            admin_user, PasswordHash.make(admin_password), roles={ADMIN_ROLE: 0}
        )
        return state

    # --- persistence (the plugin's JSON document) ---

    def to_json(self) -> dict[str, Any]:
        return {
            "defaultACLAccess": dict(self.default_access),
            "clients": [client.to_json() for client in self.clients.values()],
            "roles": [role.to_json() for role in self.roles.values()],
        }

    @classmethod
    def from_json(cls, data: Any) -> DynamicSecurity:
        """Read the JSON document; raises ValueError (KeyError, TypeError) if it is not one."""
        state = cls()
        access = data["defaultACLAccess"]
        state.default_access |= {k: _bool(access, k, v) for k, v in DEFAULT_ACCESS.items()}
        for item in data["roles"]:
            role = Role(_field(item, "rolename"), [_acl(acl) for acl in item["acls"]])
            state.roles[role.name] = role
        for item in data["clients"]:
            password = PasswordHash.from_json(item) if "password" in item else None
            roles = _role_list(state, item.get("roles", []))
            username, clientid = _field(item, "username"), _field(item, "clientid", required=False)
            state.clients[username] = Client(
                username, password, clientid, roles, _bool(item, "disabled", False)
            )
        return state

    # --- authentication and ACL checks ---

    def login(self, username: str | None, client_id: str | None) -> Client | int:
        """The client a CONNECT logs in as, before its password is checked; or the CONNACK code that
        refuses it. Check the password with `verify_password`."""
        if not client_id:
            return IDENTIFIER_REJECTED  # mosquitto's allow_zero_length_clientid false
        client = self.clients.get(username) if username is not None else None
        if client is None or client.disabled or client.password is None:
            return NOT_AUTHORIZED
        if client.clientid is not None and client.clientid != client_id:
            return NOT_AUTHORIZED
        return client

    @staticmethod
    def verify_password(client: Client | int, password: str | None) -> bool:
        """Whether `password` is the client's (a refused login spends the same time and fails)."""
        hashed = client.password if isinstance(client, Client) else None
        ok = (hashed or DECOY_HASH).verify(password or "")
        return ok and hashed is not None and password is not None

    def still_valid(self, client: Client, checked: PasswordHash | None) -> bool:
        """Whether `client` is still the current, enabled record with the password hash that was
        checked (a command may have run while the hash was computed)."""
        current = self.clients.get(client.username) is client and not client.disabled
        return current and client.password is checked

    def may_publish(self, username: str | None, topic: str) -> bool:
        decision = self._first(username, ((PUBLISH_SEND, topic_matches),), topic)
        return self.default_access[PUBLISH_SEND] if decision is None else decision

    def may_receive(self, username: str | None, topic: str) -> bool:
        decision = self._first(username, ((PUBLISH_RECEIVE, topic_matches),), topic)
        return self.default_access[PUBLISH_RECEIVE] if decision is None else decision

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        checks = ((SUBSCRIBE_LITERAL, literal_match), (SUBSCRIBE_PATTERN, filter_covered))
        decision = self._first(username, checks, topic_filter)
        return self.default_access["subscribe"] if decision is None else decision

    def may_unsubscribe(self, username: str | None, topic_filter: str) -> bool:
        checks = ((UNSUBSCRIBE_LITERAL, literal_match), (UNSUBSCRIBE_PATTERN, filter_covered))
        decision = self._first(username, checks, topic_filter)
        return self.default_access["unsubscribe"] if decision is None else decision

    def _first(
        self, username: str | None, checks: tuple[tuple[str, Callable[[str, str], bool]], ...], topic: str
    ) -> bool | None:
        """The decision of the first matching ACL: role by role (highest priority first), and within a
        role each ACL type of `checks` in turn (literal before pattern, like dynsec); None if none."""
        for role in self._compiled_for(username):
            for acltype, match in checks:
                for pattern, allow in role.get(acltype, ()):
                    if match(pattern, topic):
                        return allow
        return None

    def _compiled_for(self, username: str | None) -> list[dict[str, list[tuple[str, bool]]]]:
        """The client's roles by priority, each as ACL type -> [(topic, allow)] by priority (cached)."""
        client = self.clients.get(username) if username is not None else None
        if client is None:
            return []
        compiled = self._compiled.get(client.username)
        if compiled is None:
            compiled = []
            for name, _ in sorted(client.roles.items(), key=lambda item: -item[1]):  # stable: ties keep order
                by_type: dict[str, list[tuple[str, bool]]] = {}
                for acl in sorted(self.roles[name].acls, key=lambda a: -a.priority):
                    by_type.setdefault(acl.acltype, []).append((acl.topic, acl.allow))
                compiled.append(by_type)
            self._compiled[client.username] = compiled
        return compiled

    # --- the control API ---

    def execute(self, payload: bytes) -> Outcome:
        """Run a control message `{"commands": [...]}` in order; every command gets a response entry,
        `error` set when it failed. Never raises for bad input."""
        outcome = Outcome({"responses": []})
        responses: list[dict[str, Any]] = outcome.response["responses"]
        try:
            message = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            responses.append({"command": "Unknown command", "error": "Payload not valid JSON"})
            return outcome
        commands = message.get("commands") if isinstance(message, dict) else None
        if not isinstance(commands, list):
            responses.append({"command": "Unknown command", "error": "Invalid/missing commands"})
            return outcome
        for command in commands:
            responses.append(self._run(command, outcome))
        if outcome.changed:
            self._compiled.clear()
        return outcome

    def _run(self, command: Any, outcome: Outcome) -> dict[str, Any]:
        if not isinstance(command, dict):
            return {"command": "Unknown command", "error": "Command not an object"}
        name = command.get("command")
        if not isinstance(name, str):
            return {"command": "Unknown command", "error": "Invalid/missing command"}
        entry: dict[str, Any] = {"command": name}
        correlation = command.get("correlationData")
        if correlation is not None and not isinstance(correlation, str):
            return entry | {"error": "Invalid correlationData data type"}
        handler = _COMMANDS.get(name)
        try:
            if handler is None:
                raise CommandError("Unknown command")
            data = handler(self, command, outcome)
        except CommandError as error:
            entry["error"] = str(error)
        else:
            if data is not None:
                entry["data"] = data
        if correlation is not None:
            entry["correlationData"] = correlation
        return entry

    def _client(self, command: dict[str, Any]) -> Client:
        client = self.clients.get(_field(command, "username"))
        if client is None:
            raise CommandError("Client not found")
        return client

    def _role(self, command: dict[str, Any]) -> Role:
        role = self.roles.get(_field(command, "rolename"))
        if role is None:
            raise CommandError("Role not found")
        return role


# --- Commands: each validates everything before it changes anything -------------------------------

Handler = Callable[[DynamicSecurity, dict[str, Any], Outcome], dict[str, Any] | None]
_COMMANDS: dict[str, Handler] = {}


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = handler
        return handler

    return register


@_command("createClient")
def _create_client(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    username = _field(command, "username")
    password = _field(command, "password", required=False)
    clientid = _field(command, "clientid", required=False)
    roles = _role_list(state, command.get("roles", []))
    if command.get("groups"):
        raise CommandError("Group not found")  # groups are not part of this subset
    if username in state.clients:
        raise CommandError("Client already exists")
    hashed = PasswordHash.make(password) if password is not None else None
    state.clients[username] = Client(username, hashed, clientid, roles, _bool(command, "disabled", False))
    outcome.changed = True


@_command("deleteClient")
def _delete_client(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    client = state._client(command)
    del state.clients[client.username]
    outcome.kick.add(client.username)
    outcome.changed = True


@_command("disableClient")
def _disable_client(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    client = state._client(command)
    client.disabled = True
    outcome.kick.add(client.username)
    outcome.changed = True


@_command("enableClient")
def _enable_client(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    state._client(command).disabled = False
    outcome.changed = True


@_command("setClientPassword")
def _set_client_password(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    password = _field(command, "password")
    state._client(command).password = PasswordHash.make(password)
    outcome.changed = True


@_command("getClient")
def _get_client(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    return {"client": state._client(command).to_json(secret=False)}


@_command("listClients")
def _list_clients(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    clients = _page(list(state.clients.values()), command)
    verbose = _bool(command, "verbose", False)
    listed = [c.to_json(secret=False) if verbose else c.username for c in clients]
    return {"totalCount": len(state.clients), "clients": listed}


@_command("addClientRole")
def _add_client_role(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    client, role = state._client(command), state._role(command)
    priority = _int(command, "priority", -1)
    if role.name in client.roles:
        raise CommandError("Client is already in this role")
    client.roles[role.name] = priority
    outcome.kick.add(client.username)  # like dynsec: its subscriptions were checked under the old ACL
    outcome.changed = True


@_command("removeClientRole")
def _remove_client_role(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    client, role = state._client(command), state._role(command)
    if client.roles.pop(role.name, None) is not None:
        outcome.kick.add(client.username)
        outcome.changed = True


@_command("createRole")
def _create_role(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    name = _field(command, "rolename")
    acls = command.get("acls", [])
    if not isinstance(acls, list):
        raise CommandError("Invalid/missing acls")
    parsed = [_acl(acl) for acl in acls]
    if len({(acl.acltype, acl.topic) for acl in parsed}) < len(parsed):
        raise CommandError("ACL with this topic already exists")
    if name in state.roles:
        raise CommandError("Role already exists")
    state.roles[name] = Role(name, parsed)
    outcome.changed = True


@_command("deleteRole")
def _delete_role(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    role = state._role(command)
    del state.roles[role.name]
    for client in state.clients.values():
        if client.roles.pop(role.name, None) is not None:
            outcome.kick.add(client.username)
    outcome.changed = True


@_command("getRole")
def _get_role(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    return {"role": state._role(command).to_json()}


@_command("addRoleACL")
def _add_role_acl(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    role, acl = state._role(command), _acl(command)
    if any((a.acltype, a.topic) == (acl.acltype, acl.topic) for a in role.acls):
        raise CommandError("ACL with this topic already exists")
    role.acls.append(acl)
    outcome.changed = True


@_command("removeRoleACL")
def _remove_role_acl(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    role = state._role(command)
    acltype, topic = command.get("acltype"), command.get("topic")
    kept = [a for a in role.acls if (a.acltype, a.topic) != (acltype, topic)]
    if len(kept) == len(role.acls):
        raise CommandError("ACL not found")
    role.acls = kept
    outcome.changed = True


@_command("setDefaultACLAccess")
def _set_default_access(state: DynamicSecurity, command: dict[str, Any], outcome: Outcome) -> None:
    acls = command.get("acls")
    if not isinstance(acls, list):
        raise CommandError("Invalid/missing acls")
    changes: dict[str, bool] = {}
    for acl in acls:
        if not isinstance(acl, dict) or acl.get("acltype") not in DEFAULT_ACCESS:
            raise CommandError("Invalid acltype")
        changes[acl["acltype"]] = _bool(acl, "allow", None)
    state.default_access |= changes
    outcome.changed = True


# --- Field validation -------------------------------------------------------------------------------


def _field(data: Any, name: str, *, required: bool = True) -> Any:
    """A string field; CommandError("Invalid/missing <name>") if it is absent (when required), not a
    string, empty or not encodable. An optional empty string is None (no client id binding)."""
    value = data.get(name) if isinstance(data, dict) else None
    if not value and not required:
        return None
    if not isinstance(value, str) or not value or not is_utf8(value):
        raise CommandError(f"Invalid/missing {name}")
    return value


def _role_list(state: DynamicSecurity, roles: Any) -> dict[str, int]:
    if not isinstance(roles, list) or not all(isinstance(r, dict) for r in roles):
        raise CommandError("Invalid/missing roles")
    parsed = {_field(r, "rolename"): _int(r, "priority", -1) for r in roles}
    if not parsed.keys() <= state.roles.keys():
        raise CommandError("Role not found")
    return parsed


def _page(items: list[Any], command: dict[str, Any]) -> list[Any]:
    count = _int(command, "count", -1)
    offset = _int(command, "offset", 0)
    if offset < 0:
        raise CommandError("Invalid offset")
    return items[offset:] if count < 0 else items[offset : offset + count]


def _acl(data: Any) -> Acl:
    if not isinstance(data, dict) or data.get("acltype") not in ACL_TYPES:
        raise CommandError("Invalid acltype")
    topic = data.get("topic")
    if not isinstance(topic, str) or not valid_filter(topic):
        raise CommandError("Invalid/missing topic")
    return Acl(data["acltype"], topic, _int(data, "priority", 0), _bool(data, "allow", False))


def _int(data: dict[str, Any], name: str, default: int) -> int:
    value = data.get(name, default)
    if type(value) is not int:  # bool is an int to isinstance
        raise CommandError(f"Invalid {name}")
    return value


def _bool(data: Any, name: str, default: bool | None = None) -> bool:
    value = data.get(name, default) if isinstance(data, dict) else None
    if not isinstance(value, bool):
        raise CommandError(f"Invalid/missing {name}")
    return value
