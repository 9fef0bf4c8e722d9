"""A client for the broker's dynamic-security admin API: JSON commands on `$CONTROL/dynamic-security/v1`.

Used by the API's credential hook (one device at a time, from the API's thread pool) and by the
broker's bootstrap. Every command carries a `correlationData` of its own and the answer is matched
by it, so several API processes can share one admin account; executes are serialised by a lock.
"""

import json
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt

from broker.acl import CONTROL_TOPIC, RESPONSE_TOPIC, Command
from broker.client import BrokerTarget, ClientOptions
from broker.connection import BrokerConnection
from broker.exceptions import (
    BrokerAdminError,
    BrokerConnectError,
    BrokerPublishError,
    BrokerSubscribeError,
    Failure,
)

log = logging.getLogger(__name__)

# What names the subject of a command in a message (never "password").
_SUBJECT_FIELDS = ("username", "rolename", "groupname")


def _subject(command: Command) -> str:
    return next((str(command[f]) for f in _SUBJECT_FIELDS if f in command), "")


class DynsecAdmin:
    """The broker's dynamic-security API as one admin connection, opened on first use and again after
    it dropped. A context manager (closes the connection); safe to share between threads."""

    def __init__(self, target: BrokerTarget, *, timeout: float = 10.0, client_id: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        # Unique per process and instance: a second admin with the same id would take this session over.
        self._client_id = client_id or f"diredi-admin-{os.getpid()}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()  # one execute at a time
        self._state = threading.Condition()  # guards everything below; paho's thread notifies
        # Connected and subscribed to the responses. It stays down after a drop (it would not
        # subscribe again by itself): the next execute connects anew.
        self._connection: BrokerConnection | None = None
        self._ready = False
        self._pending: dict[str, dict[str, Any] | None] = {}  # correlation id -> its response
        self._sequence = 0

    def __enter__(self) -> "DynsecAdmin":
        with self._lock:
            self._ensure_connected()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect (a later execute connects again)."""
        with self._lock:
            self._drop()

    def execute(self, commands: Sequence[Command], *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Send `commands` in one message and return the broker's response to each, in order.
        Raises BrokerAdminError if any command was refused (after all of them ran: the error's
        `results` say which succeeded), or if the broker cannot be reached or does not answer."""
        if not commands:
            return []
        wait = self.timeout if timeout is None else timeout
        with self._lock:
            connection = self._ensure_connected()
            tokens = self._new_tokens(len(commands))
            payload = [
                {**command, "correlationData": token} for command, token in zip(commands, tokens, strict=True)
            ]
            with self._state:
                self._pending = dict.fromkeys(tokens)
            try:
                connection.send(CONTROL_TOPIC, json.dumps({"commands": payload}), qos=1)
            except BrokerPublishError as exc:
                self._drop()
                raise BrokerAdminError(f"cannot send to {self.target}: {exc}") from None
            with self._state:
                self._state.wait_for(lambda: not self._ready or None not in self._pending.values(), wait)
                answers, self._pending = self._pending, {}
                connected = self._ready
        names = ", ".join(str(c.get("command")) for c in commands)
        results = [answer for answer in answers.values() if answer is not None]
        if len(results) < len(commands):
            if connected:
                raise BrokerAdminError(f"{self.target} did not answer {names} within {wait:g} s", sent=True)
            raise BrokerAdminError(
                f"the connection to {self.target} dropped while running {names}", sent=True
            )
        for result in results:
            result.pop("correlationData", None)
        failures = [
            Failure(str(result.get("command", "?")), _subject(command), str(result["error"]))
            for command, result in zip(commands, results, strict=True)
            if "error" in result
        ]
        if failures:
            message = f"{self.target} refused " + "; ".join(str(f) for f in failures)
            raise BrokerAdminError(message, results=results, failures=failures)
        return results

    # --- the connection --------------------------------------------------------------------------

    def _new_tokens(self, count: int) -> list[str]:
        self._sequence += 1
        return [f"{self._client_id}:{self._sequence}:{i}" for i in range(count)]

    def _ensure_connected(self) -> BrokerConnection:
        with self._state:
            if self._ready and self._connection is not None:
                return self._connection
        self._drop()
        try:
            connection = BrokerConnection(self.target, ClientOptions(self._client_id), timeout=self.timeout)
            connection.client.on_message = self._on_message
            connection.on_disconnect = lambda _reason: self._on_disconnect(connection)
            with self._state:
                self._connection = connection
            connection.connect()
            connection.subscribe(RESPONSE_TOPIC, qos=1)
        except BrokerConnectError as exc:
            self._drop()
            why = exc.why if exc.reason is None else f"the broker refused the admin login ({exc.reason})"
            raise BrokerAdminError(f"cannot connect to {self.target}: {why}") from None
        except BrokerSubscribeError as exc:
            self._drop()
            if not exc.reasons:
                raise BrokerAdminError(str(exc)) from None
            raise BrokerAdminError(
                f"cannot connect to {self.target}: the admin may not read the responses ({exc.reasons[0]})"
            ) from None
        with self._state:
            self._ready = True
        return connection

    def _drop(self) -> None:
        with self._state:
            connection, self._connection, self._ready = self._connection, None, False
        if connection is not None:
            connection.close()

    def _on_disconnect(self, connection: BrokerConnection) -> None:
        with self._state:
            if connection is self._connection:
                self._ready = False
                self._state.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
            if not isinstance(responses, list) or not all(isinstance(r, dict) for r in responses):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            log.warning("ignored an unreadable dynamic-security response")
            return
        with self._state:
            if any("correlationData" in r for r in responses):
                for response in responses:
                    token = response.get("correlationData")
                    if isinstance(token, str) and token in self._pending:
                        self._pending[token] = response
            elif len(responses) == len(self._pending) and None in self._pending.values():
                # A broker that does not echo correlationData: executes are serialised, so an
                # answer of the right length while one is waiting is its answer.
                self._pending = dict(zip(self._pending, responses, strict=True))
            self._state.notify_all()
