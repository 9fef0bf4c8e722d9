"""Where a broker is, and the one place a paho client is built: one URL form and one options object
for every MQTT user (the device link, the cloud publisher, the dynamic-security admin, the benchmarks).

`mqtt://user:password@host:1883` (plain, loopback development listener), `mqtts://...:8883` (TLS,
verified against `ca_file` or the system's CAs). The protocol is MQTT 5 unless the URL says
`?protocol=3.1.1` (the embedded broker speaks only 3.1.1). `build_client` makes a paho client from a
`BrokerTarget` and `ClientOptions`; `connect_async` says where and how it connects. A connection on
paho's network thread with checked calls is `broker.connection.BrokerConnection`.
"""

import dataclasses
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.exceptions import BrokerConnectError, BrokerURLError, ClientOptionsError

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
UINT16_MAX = 65_535
SESSION_EXPIRY_MAX = 0xFFFF_FFFF  # MQTT 5: "never expires"


@dataclass(frozen=True)
class BrokerTarget:
    """A parsed MQTT URL."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    protocol: str = "5"  # "5" or "3.1.1"
    ca_file: Path | None = None
    client_cert: tuple[Path, Path] | None = None  # (certificate, key): mutual TLS, the identity in its CN

    @classmethod
    def parse(cls, url: str, *, ca_file: Path | None = None) -> "BrokerTarget":
        """Parse `mqtt[s]://[user[:password]@]host[:port][?protocol=5|3.1.1]`."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise BrokerURLError(f"MQTT URL scheme must be mqtt or mqtts, not {parts.scheme!r}")
        if not parts.hostname:
            raise BrokerURLError("MQTT URL has no host")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError:
            raise BrokerURLError("MQTT URL has an invalid port") from None
        query = parse_qs(parts.query)
        unknown = set(query) - {"protocol"}
        if unknown:
            raise BrokerURLError(f"MQTT URL has unknown parameters: {', '.join(sorted(unknown))}")
        protocol = query.get("protocol", ["5"])[-1]
        if protocol not in PROTOCOLS:
            raise BrokerURLError(f"MQTT protocol must be 5 or 3.1.1, not {protocol!r}")
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=parts.scheme == "mqtts",
            protocol=protocol,
            ca_file=ca_file,
        )

    def with_credentials(self, username: str, password: str) -> "BrokerTarget":
        """The same broker, as another account."""
        return dataclasses.replace(self, username=username, password=password)

    def with_certificate(self, certificate: Path, key: Path) -> "BrokerTarget":
        """The same broker, as the identity that `certificate` (with its `key`) names; no password."""
        return dataclasses.replace(self, username=None, password=None, client_cert=(certificate, key))

    def url(self) -> str:
        """The URL of this target, password included (for configuration, never for logs)."""
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        query = "" if self.protocol == "5" else f"?protocol={self.protocol}"
        return f"{scheme}://{auth}{self.host}:{self.port}{query}"

    def __str__(self) -> str:  # safe to log
        who = f"{self.username}@" if self.username else ""
        if self.client_cert is not None:
            who = f"[certificate {self.client_cert[0].name}]@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{who}{self.host}:{self.port} (MQTT {self.protocol})"

    def client(self, client_id: str, *, persistent: bool = False) -> mqtt.Client:
        """Shorthand: `build_client` with nothing but a client id and `persistent`."""
        return build_client(self, ClientOptions(client_id, persistent=persistent))

    def connect(
        self,
        client: mqtt.Client,
        *,
        persistent: bool = False,
        keepalive: int = 30,
        receive_maximum: int | None = None,
    ) -> None:
        """Shorthand: `connect_async` for a client made by `client()`."""
        _connect_async(client, self, persistent, _SESSION_EXPIRY, keepalive, receive_maximum)


_SESSION_EXPIRY = 86_400  # seconds a persistent MQTT 5 session outlives its connection, by default


@dataclass(frozen=True)
class Will:
    """What the broker publishes for a client whose connection ends without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not self.topic or "+" in self.topic or "#" in self.topic:
            raise ClientOptionsError(f"a will needs a topic without wildcards, not {self.topic!r}")
        if not isinstance(self.payload, bytes):
            raise ClientOptionsError(f"a will's payload must be bytes, not {type(self.payload).__name__}")
        _check_int("the will's qos", self.qos, 0, 2)


@dataclass(frozen=True)
class ReconnectPolicy:
    """After an established connection dropped, paho's network thread connects again, waiting
    `first_delay` seconds, then twice as long each failed attempt, at most `max_delay`."""

    first_delay: int = 1
    max_delay: int = 120

    def __post_init__(self) -> None:
        _check_int("the first reconnect delay", self.first_delay, 1, 86_400)
        _check_int("the longest reconnect delay", self.max_delay, self.first_delay, 86_400)


@dataclass(frozen=True)
class ClientOptions:
    """How a client meets the broker. `persistent`: the broker keeps the session (subscriptions,
    queued QoS 1 messages) `session_expiry` seconds after the connection ends (MQTT 5; a 3.1.1 broker
    keeps it until the client comes back with a clean session). `receive_maximum`: at most that many
    unacknowledged QoS 1 messages from the broker at once (MQTT 5); `max_inflight`: at most that many
    of ours. `reconnect`: None stays down after a drop (the owner decides what next)."""

    client_id: str
    persistent: bool = False
    session_expiry: int = _SESSION_EXPIRY
    keepalive: int = 30
    receive_maximum: int | None = None
    max_inflight: int | None = None
    will: Will | None = None
    reconnect: ReconnectPolicy | None = None

    def __post_init__(self) -> None:
        # An empty id would let the broker make one up: a session nobody can resume or own.
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ClientOptionsError(f"the client id must be a non-empty string, not {self.client_id!r}")
        if len(self.client_id.encode()) > UINT16_MAX:
            raise ClientOptionsError("the client id is longer than MQTT allows (65,535 bytes)")
        _check_int("the session expiry", self.session_expiry, 0, SESSION_EXPIRY_MAX)
        _check_int("the keepalive", self.keepalive, 0, UINT16_MAX)
        if self.receive_maximum is not None:
            _check_int("the receive maximum", self.receive_maximum, 1, UINT16_MAX)
        if self.max_inflight is not None:
            _check_int("the in-flight maximum", self.max_inflight, 1, UINT16_MAX)
        if self.will is not None and not isinstance(self.will, Will):
            raise ClientOptionsError(f"the will must be a Will, not {type(self.will).__name__}")
        if self.reconnect is not None and not isinstance(self.reconnect, ReconnectPolicy):
            raise ClientOptionsError(
                f"reconnect must be a ReconnectPolicy, not {type(self.reconnect).__name__}"
            )


def _check_int(what: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ClientOptionsError(f"{what} must be a whole number from {low} to {high}, not {value!r}")


def build_client(target: BrokerTarget, options: ClientOptions) -> mqtt.Client:
    """A paho client for `target` as `options` say, not yet connected: callback API version 2, the
    target's credentials and TLS, the will, the in-flight window and the reconnect policy.
    BrokerConnectError when the target's CA file cannot be read."""
    protocol = PROTOCOLS[target.protocol]
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=options.client_id,
        protocol=protocol,
        # 3.1.1 asks for the session here; MQTT 5 in the CONNECT (`connect_async`).
        clean_session=None if protocol == mqtt.MQTTv5 else not options.persistent,
        reconnect_on_failure=options.reconnect is not None,
    )
    if target.username is not None:
        client.username_pw_set(target.username, target.password)
    if target.tls:
        try:
            context = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None)
        except (OSError, ValueError) as exc:
            raise BrokerConnectError(
                target, f"the CA file {target.ca_file} is unusable ({type(exc).__name__})"
            ) from None
        if target.client_cert is not None:
            try:
                context.load_cert_chain(*target.client_cert)
            except (OSError, ssl.SSLError) as exc:
                raise BrokerConnectError(
                    target,
                    f"the client certificate {target.client_cert[0]} is unusable ({type(exc).__name__})",
                ) from None
        client.tls_set_context(context)
    if options.will is not None:
        will = options.will
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    if options.max_inflight is not None:
        client.max_inflight_messages_set(options.max_inflight)
    if options.reconnect is not None:
        client.reconnect_delay_set(options.reconnect.first_delay, options.reconnect.max_delay)
    return client


def connect_async(client: mqtt.Client, target: BrokerTarget, options: ClientOptions) -> None:
    """Tell `client` (built by `build_client`) where and how to connect; the connection is made by
    `client.reconnect()` (at once) or by paho's network loop. Writes nothing yet."""
    _connect_async(
        client, target, options.persistent, options.session_expiry, options.keepalive, options.receive_maximum
    )


def _connect_async(
    client: mqtt.Client,
    target: BrokerTarget,
    persistent: bool,
    session_expiry: int,
    keepalive: int,
    receive_maximum: int | None,
) -> None:
    if PROTOCOLS[target.protocol] == mqtt.MQTTv5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry if persistent else 0
        if receive_maximum is not None:
            properties.ReceiveMaximum = receive_maximum
        client.connect_async(
            target.host, target.port, keepalive, clean_start=not persistent, properties=properties
        )
    else:
        client.connect_async(target.host, target.port, keepalive)
