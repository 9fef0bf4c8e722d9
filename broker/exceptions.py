"""Errors of the broker package, under one base class."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from paho.mqtt.reasoncodes import ReasonCode

from wire.errors import ContractError


class BrokerError(Exception):
    """Base class of every error the broker package raises on purpose."""


@dataclass(frozen=True)
class Failure:
    """One command the broker refused: its name, what it was about, and the broker's reason."""

    command: str
    subject: str
    error: str

    def __str__(self) -> str:
        about = f" {self.subject}" if self.subject else ""
        return f"{self.command}{about}: {self.error}"


class BrokerAdminError(BrokerError):
    """The broker could not be reached as the admin, or refused a command. The message names the
    broker (never its password) and each refused command and its subject (never a client's password).

    `results` holds the broker's response to each command, in order, when it answered; `failures`
    the refused ones. `sent`: the commands reached the connection, so they may have run even when no
    answer came."""

    def __init__(
        self,
        message: str,
        *,
        results: Sequence[dict[str, Any]] = (),
        failures: Sequence[Failure] = (),
        sent: bool = False,
    ) -> None:
        super().__init__(message)
        self.results = list(results)
        self.failures = list(failures)
        self.sent = sent or bool(results)


class BrokerURLError(BrokerError, ContractError):
    """An MQTT URL that cannot be used; the text says which part is wrong (never the password)."""


class MosquittoError(BrokerError, RuntimeError):
    """mosquitto or one of its tools is missing, refused its configuration, or did not start."""


class CommandError(BrokerError, ValueError):
    """A control command (or a state document) that cannot be used; the text is the response's `error`."""


class EmbeddedBrokerError(BrokerError):
    """The embedded broker cannot start (port taken, unreadable state file, no admin password)."""


class ClientOptionsError(BrokerError, ValueError):
    """MQTT client options that cannot work (a negative keepalive, QoS 3, an empty client id...)."""


class BrokerConnectError(BrokerError):
    """No MQTT connection: the broker was not reached, refused the login, or did not answer in time.
    The message names the broker (never its password) and why; `reason` is the CONNACK's reason code
    when the broker answered, None when it was not reached."""

    def __init__(self, target: object, why: str, *, reason: ReasonCode | None = None) -> None:
        super().__init__(f"cannot connect to {target}: {why}")
        self.why = why
        self.reason = reason


class BrokerPublishError(BrokerError):
    """A checked publish failed: not connected, the connection dropped, the broker refused it
    (`reason`, MQTT 5 only) or left it unacknowledged past the deadline. It may still be delivered
    later when the connection dropped: paho keeps it and sends it again after a reconnect."""

    def __init__(self, message: str, *, reason: ReasonCode | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class BrokerSubscribeError(BrokerError):
    """A checked subscribe failed: `reasons` holds the SUBACK's reason codes when the broker answered."""

    def __init__(self, message: str, *, reasons: Sequence[ReasonCode] = ()) -> None:
        super().__init__(message)
        self.reasons = list(reasons)
