"""The cloud's voice on the broker: signed `DesiredModel` documents (retained, so a device that connects
later still gets its latest one) and `cmd` messages, published as the cloud's service account."""

import secrets
import threading
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.client import BrokerTarget
from cloud.exceptions import CloudError
from cloud.signing import KeyRing
from wire.desired import DesiredModel
from wire.manifest import ArtifactManifest
from wire.messages import Command, CommandName, encode
from wire.topics import MessageKind, device_topic


class PublishError(CloudError):
    """The broker could not be reached, or did not acknowledge a message in time."""


class CloudPublisher:
    """A connected publisher; use as a context manager. Every publish waits for the broker's PUBACK."""

    def __init__(self, target: BrokerTarget, keyring: KeyRing, *, timeout: float = 10.0) -> None:
        self.target = target
        self.keyring = keyring
        self.timeout = timeout
        self._connected = threading.Event()
        self._refusal: str | None = None
        self._client = target.client(f"diredi-publisher-{secrets.token_hex(4)}")
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
        document = self.keyring.sign_desired(device_id=device_id, manifest=manifest, rollback_of=rollback_of)
        self._publish(device_topic(device_id, MessageKind.MODEL_DESIRED), encode(document), retain=True)
        return document

    def clear_desired(self, device_id: str) -> None:
        """Remove the retained desired model of a device (it was revoked)."""
        self._publish(device_topic(device_id, MessageKind.MODEL_DESIRED), b"", retain=True)

    def send_command(self, device_id: str, command: CommandName) -> Command:
        """Ask one device to run `command` (delivered when it is connected, or when its session resumes)."""
        message = Command(device_id=device_id, command=command)
        self._publish(device_topic(device_id, MessageKind.CMD), encode(message), retain=False)
        return message

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise PublishError(f"the broker did not take the message for {topic}: {exc}") from None
        if not info.is_published():
            raise PublishError(
                f"the broker did not acknowledge the message for {topic} within {self.timeout} s"
            )
