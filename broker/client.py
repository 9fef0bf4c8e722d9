"""Where a broker is and how to connect a paho client to it: one URL form for every MQTT user.

`mqtt://user:password@host:1883` (plain, loopback development listener), `mqtts://...:8883` (TLS,
verified against `ca_file` or the system's CAs). The protocol is MQTT 5 unless the URL says
`?protocol=3.1.1` (the embedded broker speaks only 3.1.1).
"""

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.exceptions import BrokerURLError

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


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
        return BrokerTarget(self.host, self.port, username, password, self.tls, self.protocol, self.ca_file)

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
        return f"{'mqtts' if self.tls else 'mqtt'}://{who}{self.host}:{self.port} (MQTT {self.protocol})"

    def client(self, client_id: str, *, persistent: bool = False) -> mqtt.Client:
        """A paho client for this target, not yet connected. `persistent`: the broker keeps the
        session (subscriptions, queued QoS 1 messages) while the client is away."""
        protocol = PROTOCOLS[self.protocol]
        if protocol == mqtt.MQTTv5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=protocol,
                clean_session=not persistent,
            )
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            client.tls_set_context(context)
        return client

    def connect(
        self,
        client: mqtt.Client,
        *,
        persistent: bool = False,
        keepalive: int = 30,
        receive_maximum: int | None = None,
    ) -> None:
        """Start connecting `client` (a 5 client keeps its session a day when `persistent`, and takes at
        most `receive_maximum` unacknowledged QoS 1 messages at once)."""
        if PROTOCOLS[self.protocol] == mqtt.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 86_400 if persistent else 0
            if receive_maximum is not None:
                properties.ReceiveMaximum = receive_maximum
            client.connect_async(
                self.host, self.port, keepalive, clean_start=not persistent, properties=properties
            )
        else:
            client.connect_async(self.host, self.port, keepalive)
