"""The cloud's voice on the broker: signed `DesiredModel` documents (retained, so a device that connects
later still gets its latest one) and `cmd` messages, published as the cloud's service account."""

import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType

from broker.client import BrokerTarget, ClientOptions, ReconnectPolicy
from broker.connection import BrokerConnection
from broker.exceptions import BrokerConnectError, BrokerPublishError
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
        """`client_id`: the one the broker binds this account to, if it does. BrokerConnectError when
        the target's CA file cannot be read."""
        self.target = target
        self.keyring = keyring
        self.timeout = timeout
        options = ClientOptions(
            client_id or f"diredi-publisher-{secrets.token_hex(4)}",
            max_inflight=MAX_INFLIGHT,
            reconnect=ReconnectPolicy(),  # a long-lived worker's publisher comes back after a drop
        )
        self._connection = BrokerConnection(target, options, timeout=timeout)

    def __enter__(self) -> "CloudPublisher":
        try:
            self._connection.connect()
        except BrokerConnectError as exc:
            raise PublishError(f"could not connect to the broker {self.target}: {exc.why}") from None
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._connection.close()

    def publish_desired(
        self, device_id: str, manifest: ArtifactManifest, *, rollback_of: str | None = None
    ) -> DesiredModel:
        """Sign and publish (retained) the model `device_id` should run; return the signed document."""
        return self.publish_desired_many([Desired(device_id, manifest, rollback_of)])[0]

    def publish_desired_many(self, wanted: Sequence[Desired]) -> list[DesiredModel]:
        """Sign and publish (retained) each device's desired model, and return once the broker has
        acknowledged them all: they go out together, so a wave costs a few round trips, not one per
        device (a caller holding locks holds them that much shorter).

        PublishError when the connection is gone or drops, or the broker refuses one or leaves it
        unacknowledged for `timeout` seconds (each is waited for in turn). Some devices may have
        theirs by then, and others are still queued in this publisher: a caller that rolls back
        drops the publisher, as the worker does."""
        documents = self.keyring.sign_desired_many(wanted)
        try:
            sent = [
                self._connection.send(
                    device_topic(d.device_id, MessageKind.MODEL_DESIRED), encode(d), retain=True
                )
                for d in documents
            ]
            for message in sent:
                self._connection.wait(message)
        except BrokerPublishError as exc:
            raise PublishError(str(exc)) from None
        return documents

    def publish_trust(self, chain: TrustChain) -> None:
        """Publish (retained) the fleet's trust chain: every device, connected now or later, gets it."""
        self._publish(TRUST_TOPIC, chain.to_json().encode(), retain=True)

    def clear_desired(self, device_id: str) -> None:
        """Remove the retained desired model of a device (it was revoked)."""
        self._publish(device_topic(device_id, MessageKind.MODEL_DESIRED), b"", retain=True)

    def send_command(
        self,
        device_id: str,
        command: CommandName,
        *,
        msg_id: uuid.UUID | None = None,
        expires_at: datetime | None = None,
    ) -> Command:
        """Ask one device to run `command` (delivered when it is connected, or when its session resumes).
        `msg_id`: the stored command's id, the same on every send, so the device answers it once."""
        message = Command(
            device_id=device_id, command=command, expires_at=expires_at, msg_id=msg_id or uuid.uuid4()
        )
        self._publish(device_topic(device_id, MessageKind.CMD), encode(message), retain=False)
        return message

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        try:
            self._connection.publish(topic, payload, retain=retain)
        except BrokerPublishError as exc:
            raise PublishError(str(exc)) from None
