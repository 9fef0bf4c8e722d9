"""One MQTT connection on paho's network thread, with calls that wait for the broker's answer.

`connect` returns once the CONNACK came, and raises BrokerConnectError naming the broker and why
(not reachable, refused and its reason code, no answer before the deadline); `publish` waits for the
PUBACK (QoS 1) and `subscribe` for the SUBACK, each raising when the broker refused, the connection
dropped or the deadline passed; `close` (or leaving the `with` block) disconnects and ends the
thread. The first connection is never retried; once it is up, `ClientOptions.reconnect` says whether
paho reconnects after a drop.

The connection owns paho's connect, disconnect, publish and subscribe callbacks; its owner may set
`client.on_message` and `on_disconnect` (called on paho's thread with the reason code).
"""

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.client import BrokerTarget, ClientOptions, build_client, connect_async
from broker.exceptions import BrokerConnectError, BrokerPublishError, BrokerSubscribeError

_POLL_S = 0.05  # how often a wait for a PUBACK looks whether the connection is still up


@dataclass(frozen=True)
class Sent:
    """A publish on its way: `BrokerConnection.wait` tells whether the broker took it."""

    topic: str
    info: mqtt.MQTTMessageInfo
    epoch: int  # the connection it went out on


class BrokerConnection:
    """A paho client built from `options`, connected on demand; a context manager (connects on entry,
    closes on exit). `timeout`: the deadline of each call that does not name its own. Thread-safe."""

    def __init__(self, target: BrokerTarget, options: ClientOptions, *, timeout: float = 10.0) -> None:
        """BrokerConnectError when the target's CA file cannot be read."""
        self.target = target
        self.options = options
        self.timeout = timeout
        self.client = build_client(target, options)
        self.session_present = False  # whether the broker resumed a persistent session
        self.on_disconnect: Callable[[ReasonCode], None] | None = None
        self._state = threading.Condition()  # guards what follows; paho's thread notifies
        self._connack: ReasonCode | None = None  # the last CONNACK
        self._hung_up = False  # the broker closed the first connection before its CONNACK
        self._closing = False
        self._up = False
        self._epoch = 0  # connections established so far
        self._subacks: dict[int, list[ReasonCode]] = {}
        # PUBACK reason codes by message id, written by paho's thread before it marks the message
        # published; at most one per id, so the dict stays small even for publishes nobody waits for.
        self._pubacks: dict[int, ReasonCode] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def __enter__(self) -> "BrokerConnection":
        self.connect()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether the connection is up now."""
        return self._up

    def connect(self, timeout: float | None = None) -> ReasonCode:
        """Connect and return the CONNACK's (successful) reason code once it came, at most `timeout`
        seconds from now; then paho's network thread serves the connection. Call it once."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        self.client.connect_timeout = max(wait, 0.001)  # the TCP connection and the TLS handshake
        try:
            connect_async(self.client, self.target, self.options)
            self.client.reconnect()  # here, not on paho's thread: the error says why
        except (OSError, ValueError) as exc:
            self.close()
            raise BrokerConnectError(self.target, f"the broker is not reachable ({_describe(exc)})") from None
        self.client.loop_start()
        with self._state:
            self._state.wait_for(
                lambda: self._connack is not None or self._hung_up, deadline - time.monotonic()
            )
            reason, hung_up = self._connack, self._hung_up
        if reason is None:
            self.close()
            why = "the broker closed the connection unanswered" if hung_up else f"no answer within {wait:g} s"
            raise BrokerConnectError(self.target, why)
        if reason.is_failure:
            self.close()
            raise BrokerConnectError(self.target, f"the broker refused the login ({reason})", reason=reason)
        return reason

    def close(self) -> None:
        """Disconnect (no will) and end paho's network thread; what is not acknowledged yet is lost."""
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()

    # Checked calls --------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
    ) -> ReasonCode:
        """Publish and return once the broker acknowledged it (QoS 1: the PUBACK's reason code; QoS 0:
        written). BrokerPublishError if it did not within `timeout` seconds, or refused it, or the
        connection dropped first."""
        return self.wait(self.send(topic, payload, qos=qos, retain=retain), timeout)

    def send(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> Sent:
        """Publish without waiting (`wait` does); BrokerPublishError when not connected."""
        with self._state:
            up, epoch = self._up, self._epoch
        if not up:
            raise BrokerPublishError(f"not connected to {self.target}: nothing published on {topic}")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:  # NO_CONN: the connection dropped just now
            raise BrokerPublishError(
                f"cannot publish on {topic} to {self.target}: {mqtt.error_string(info.rc)}"
            )
        return Sent(topic, info, epoch)

    def wait(self, sent: Sent, timeout: float | None = None) -> ReasonCode:
        """Until the broker took `sent` (see `publish`)."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while not sent.info.is_published():
            if not self._up or self._epoch != sent.epoch:
                raise BrokerPublishError(
                    f"the connection to {self.target} dropped before the broker took the message "
                    f"for {sent.topic}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerPublishError(
                    f"{self.target} did not acknowledge the message for {sent.topic} within {wait:g} s"
                )
            try:
                sent.info.wait_for_publish(min(left, _POLL_S))
            except (RuntimeError, ValueError) as exc:  # paho gave the message up
                raise BrokerPublishError(f"cannot publish on {sent.topic} to {self.target}: {exc}") from None
        reason = self._pubacks.pop(sent.info.mid, None) or ReasonCode(PacketTypes.PUBACK)
        if reason.is_failure:
            raise BrokerPublishError(
                f"{self.target} refused the message for {sent.topic} ({reason})", reason=reason
            )
        return reason

    def subscribe(
        self, topics: str | Sequence[str], *, qos: int = 1, timeout: float | None = None
    ) -> list[ReasonCode]:
        """Subscribe and return the SUBACK's reason code of each topic filter once it came.
        BrokerSubscribeError if the broker refused any (its `reasons` say which), or did not answer
        within `timeout` seconds, or the connection dropped first."""
        filters = [topics] if isinstance(topics, str) else list(topics)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        # Holding the lock from SUBSCRIBE to the wait: the SUBACK cannot be recorded before its id is.
        with self._state:
            result, mid = self.client.subscribe([(f, qos) for f in filters])
            if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
                raise BrokerSubscribeError(f"cannot subscribe at {self.target}: {mqtt.error_string(result)}")
            self._subacks.pop(mid, None)
            epoch = self._epoch
            self._state.wait_for(
                lambda: mid in self._subacks or self._epoch != epoch or not self._up,
                deadline - time.monotonic(),
            )
            reasons = self._subacks.pop(mid, None)
        what = ", ".join(filters)
        if reasons is None:
            why = (
                "the connection dropped"
                if not self._up or self._epoch != epoch
                else f"no answer within {wait:g} s"
            )
            raise BrokerSubscribeError(f"cannot subscribe to {what} at {self.target}: {why}")
        refused = [f"{f} ({r})" for f, r in zip(filters, reasons, strict=False) if r.is_failure]
        if refused:
            raise BrokerSubscribeError(f"{self.target} refused {', '.join(refused)}", reasons=reasons)
        return reasons

    # paho's callbacks (its network thread) ----------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure and not self._epoch:
            client.disconnect()  # a refused first connection stays down: paho would try it again
        with self._state:
            self._connack = reason
            if not reason.is_failure:
                self._up, self._epoch = True, self._epoch + 1
                self.session_present = flags.session_present
            self._state.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._epoch:
            client.disconnect()  # the first connection ended unanswered: it stays down too
        with self._state:
            was_up, self._up = self._up, False
            self._hung_up = not self._epoch
            self._state.notify_all()
        if was_up and not self._closing and self.on_disconnect is not None:
            self.on_disconnect(reason)

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        self._pubacks[mid] = reason

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._state:
            self._subacks[mid] = reasons
            self._state.notify_all()


def _describe(error: BaseException) -> str:
    detail = str(error)
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__
