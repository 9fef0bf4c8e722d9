"""The cloud publisher: signed desired models (retained, one per device) and commands, on both brokers."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.client import BrokerTarget
from cloud.children import free_ports
from cloud.exceptions import PublishError
from cloud.publisher import CloudPublisher
from cloud.signing import Desired, KeyRing
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.cloud.factories import make_manifest
from wire.desired import verify_raw
from wire.messages import CommandName, decode
from wire.topics import MessageKind, device_topic


@pytest.fixture(params=["embedded_broker", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> RunningBroker:
    running: RunningBroker = request.getfixturevalue(request.param)
    return running


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    return KeyRing.open(tmp_path / "keys")


def subscribed_device(broker: RunningBroker, device_id: str, kind: MessageKind) -> Probe:
    """A device, connected as itself and subscribed to its own topic of `kind`."""
    probe = Probe(broker.as_device(device_id, provisioned_device(broker, device_id)), device_id)
    reason = probe.connect()
    assert reason is not None and not reason.is_failure, reason
    assert not probe.subscribe(device_topic(device_id, kind)).is_failure
    return probe


def test_a_desired_model_is_signed_retained_and_reaches_a_device_that_connects_later(
    broker: RunningBroker, keyring: KeyRing
) -> None:
    # Prepare
    device_id = new_device_id("pub")
    manifest = make_manifest(b"int8 flatbuffer", line="kitchen", version=1)

    # Execute
    with CloudPublisher(broker.cloud, keyring) as publisher:
        sent = publisher.publish_desired(device_id, manifest)
    with subscribed_device(broker, device_id, MessageKind.MODEL_DESIRED) as device:
        message = device.expect_message(5.0)

    # Assert
    assert message is not None and message.retain
    received = verify_raw(bytes(message.payload), keyring.trusted())
    assert received == sent
    assert (received.device_id, received.manifest.sha256) == (device_id, manifest.sha256)


def test_a_wave_of_desired_models_goes_out_together_each_to_its_own_device(
    broker: RunningBroker, keyring: KeyRing
) -> None:
    # Prepare: 200 devices, every tenth told to roll back
    v1 = make_manifest(b"int8 v1", line="kitchen", version=1)
    v2 = make_manifest(b"int8 v2", line="kitchen", version=2)
    wave = [
        Desired(new_device_id("wave"), v1, rollback_of=v2.model_id)
        if n % 10 == 0
        else Desired(new_device_id("wave"), v2)
        for n in range(200)
    ]

    # Execute
    with CloudPublisher(broker.cloud, keyring) as publisher:
        sent = publisher.publish_desired_many(wave)

    # Assert: what each of three devices finds retained is its own document
    assert [(d.device_id, d.manifest, d.rollback_of) for d in sent] == [tuple(w) for w in wave]
    for desired, document in [(wave[0], sent[0]), (wave[101], sent[101]), (wave[-1], sent[-1])]:
        with subscribed_device(broker, desired.device_id, MessageKind.MODEL_DESIRED) as device:
            message = device.expect_message(5.0)
        assert message is not None and message.retain
        assert verify_raw(bytes(message.payload), keyring.trusted()) == document


def test_clearing_the_desired_model_removes_the_retained_document(
    broker: RunningBroker, keyring: KeyRing
) -> None:
    # Prepare
    device_id = new_device_id("pub")
    with CloudPublisher(broker.cloud, keyring) as publisher:
        publisher.publish_desired(device_id, make_manifest(b"int8 flatbuffer", line="kitchen", version=1))

        # Execute
        publisher.clear_desired(device_id)

    # Assert
    with subscribed_device(broker, device_id, MessageKind.MODEL_DESIRED) as device:
        assert device.expect_message(1.0) is None


def test_a_command_reaches_its_device(broker: RunningBroker, keyring: KeyRing) -> None:
    # Prepare
    device_id = new_device_id("pub")
    device = subscribed_device(broker, device_id, MessageKind.CMD)

    # Execute
    with device, CloudPublisher(broker.cloud, keyring) as publisher:
        sent = publisher.send_command(device_id, CommandName.run_rd)
        message = device.expect_message(5.0)

    # Assert
    assert message is not None
    kind, command = decode(message.topic, bytes(message.payload))
    assert kind is MessageKind.CMD and command == sent


def test_a_broker_that_refuses_the_account_is_a_clear_error(broker: RunningBroker, keyring: KeyRing) -> None:
    # Prepare
    wrong = broker.cloud.with_credentials(str(broker.cloud.username), "not-the-password")

    # Execute / Assert
    with pytest.raises(PublishError, match="could not connect to the broker"):
        CloudPublisher(wrong, keyring, timeout=3).__enter__()


def test_an_unreachable_broker_is_a_clear_error(keyring: KeyRing) -> None:
    # Prepare: a port nobody listens on
    nowhere = BrokerTarget(host="127.0.0.1", port=free_ports(1)[0])

    # Execute / Assert
    with pytest.raises(PublishError, match="could not connect"):
        CloudPublisher(nowhere, keyring, timeout=2).__enter__()
