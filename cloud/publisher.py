"""The cloud's voice on the broker: signed `DesiredModel` documents (retained, so a device that connects
later still gets its latest one) and `cmd` messages, published as the cloud's service account."""

import secrets
import threading
from collections.abc import Sequence
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.client import BrokerTarget
from cloud.exceptions import PublishError
from cloud.signing import Desired, KeyRing
from wire.desired import DesiredModel
from wire.manifest import ArtifactManifest
from wire.messages import Command, CommandName, encode
from wire.topics import TRUST_TOPIC, MessageKind, device_topic
from wire.trust import TrustChain

# Our QoS 1 messages the broker has not acknowledged yet, at most (the broker's receive maximum may cap
# it lower): a wave's desired models go out back to back, not one round trip each.
MAX_INFLIGHT = 100


class CloudPublisher:
    """A connected publisher; use as a context manager. Every publish returns once the broker has
    acknowledged it (PUBACK)."""

    def __init__(
        self, target: BrokerTarget, keyring: KeyRing, *, timeout: float = 10.0, client_id: str | None = None
    ) -> None:
        """`client_id`: the one the broker binds this account to, if it does."""
        self.target = target
        self.keyring = keyring
        self.timeout = timeout
        self._connected = threading.Event()
        self._refusal: str | None = None
        self._client = target.client(client_id or f"diredi-publisher-{secrets.token_hex(4)}")
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    def __enter__(self) -> "CloudPublisher":
        self.target.connect(self._client)
        self._client.loop_start()
        if not self._connected.wait(self.timeout):
            self._client.loop_stop()
            why = self._refusal or "no answer"
            raise PublishError(f"could not connect to the broker {self.target}: {why}")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
        else:
            self._connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()

    def publish_desired(
        self, device_id: str, manifest: ArtifactManifest, *, rollback_of: str | None = None
    ) -> DesiredModel:
        """Sign and publish (retained) the model `device_id` should run; return the signed document."""
        return self.publish_desired_many([Desired(device_id, manifest, rollback_of)])[0]

    def publish_desired_many(self, wanted: Sequence[Desired]) -> list[DesiredModel]:
        """Sign and publish (retained) each device's desired model, and return once the broker has
        acknowledged them all: they go out together, so a wave costs a few round trips, not one per
        device (a caller holding locks holds them that much shorter).

        PublishError when the connection is gone, or the broker leaves one unacknowledged for
        `timeout` seconds (each is waited for in turn). Some devices may have theirs by then, and
        others are still queued in this publisher: a caller that rolls back drops the publisher, as
        the worker does."""
        sent = []
        for document in self.keyring.sign_desired_many(wanted):
            topic = device_topic(document.device_id, MessageKind.MODEL_DESIRED)
            sent.append((document, topic, self._client.publish(topic, encode(document), qos=1, retain=True)))
        for _, topic, info in sent:
            self._wait(topic, info)
        return [document for document, _, _ in sent]

    def publish_trust(self, chain: TrustChain) -> None:
        """Publish (retained) the fleet's trust chain: every device, connected now or later, gets it."""
        self._publish(TRUST_TOPIC, chain.to_json().encode(), retain=True)

    def clear_desired(self, device_id: str) -> None:
        """Remove the retained desired model of a device (it was revoked)."""
        self._publish(device_topic(device_id, MessageKind.MODEL_DESIRED), b"", retain=True)

    def send_command(self, device_id: str, command: CommandName) -> Command:
        """Ask one device to run `command` (delivered when it is connected, or when its session resumes)."""
        message = Command(device_id=device_id, command=command)
        self._publish(device_topic(device_id, MessageKind.CMD), encode(message), retain=False)
        return message

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self._wait(topic, self._client.publish(topic, payload, qos=1, retain=retain))

    def _wait(self, topic: str, info: mqtt.MQTTMessageInfo) -> None:
        """Until the broker acknowledged `info`; PublishError after `timeout` seconds without it."""
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise PublishError(f"the broker did not take the message for {topic}: {exc}") from None
        if not info.is_published():
            raise PublishError(
                f"the broker did not acknowledge the message for {topic} within {self.timeout} s"
            )
