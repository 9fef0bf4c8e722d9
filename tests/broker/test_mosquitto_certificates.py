"""mosquitto in certificate mode (broker/mosquitto-certificate.conf): devices log in with a certificate of
the fleet CA and one pattern ACL governs them all; the ACL attack matrix with certificate devices: another
device's topics, another device's client id, no certificate, another CA, an expired certificate, and a
revoked one once the CRL is reloaded (SIGHUP)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from cloud.fleet_ca import CLAIM_CA_NAME, FleetCA
from tests.broker.certificates import (
    NO_CERTIFICATE,
    NOT_AUTHORIZED,
    VERIFY_FAILED,
    Broker,
    certificate_broker,
    close,
    connect,
    device_files,
    publish,
    refusals,
    reload,
    subscribe,
)
from tests.brokers import CLOUD_USER
from tests.polling import wait_until
from wire.topics import MessageKind, device_topic


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with certificate_broker(tmp_path_factory.mktemp("mtls")) as running:
        yield running


def test_a_device_publishes_its_own_topics_only_and_hears_only_its_own(broker: Broker) -> None:
    # Prepare: two devices, and the cloud on the services' listener
    one = device_files(broker.ca, broker.work, "cam-0001")
    device = connect(broker.device_port, broker.ca_file, cert=one[:2], client_id="cam-0001")
    assert not device.refused, device.refused
    subscribe(device, "diredi/v1/#")
    cloud = connect(
        broker.service.port, broker.ca_file, client_id=CLOUD_USER,
        login=(str(broker.service.username), str(broker.service.password)),
    )  # fmt: skip
    assert not cloud.refused, cloud.refused
    subscribe(cloud, f"diredi/v1/dev/+/{MessageKind.STATUS.value}")

    try:
        # Execute
        own = publish(device, device_topic("cam-0001", MessageKind.STATUS))
        other = publish(device, device_topic("cam-0002", MessageKind.STATUS))
        desired = publish(device, device_topic("cam-0001", MessageKind.MODEL_DESIRED))
        control = publish(device, "$CONTROL/dynamic-security/v1")
        for target in ("cam-0001", "cam-0002"):
            publish(cloud, device_topic(target, MessageKind.CMD))

        # Assert: its own status goes through; another's topics, its desired model and $CONTROL do not;
        # of the two commands it hears only its own
        assert own == 0 and (other, desired, control) == (NOT_AUTHORIZED,) * 3
        wait_until(
            lambda: device_topic("cam-0001", MessageKind.STATUS) in cloud.received,
            timeout=5,
            missing="the status",
        )
        wait_until(
            lambda: device_topic("cam-0001", MessageKind.CMD) in device.received,
            timeout=5,
            missing="its command",
        )
        assert device_topic("cam-0002", MessageKind.CMD) not in device.received
        assert cloud.received == [device_topic("cam-0001", MessageKind.STATUS)]
    finally:
        close(device, cloud)


def test_a_device_that_asks_for_another_client_id_is_itself_all_the_same(broker: Broker) -> None:
    # Prepare: cam-0002 is connected; cam-0003 asks for cam-0002's client id
    victim = connect(
        broker.device_port,
        broker.ca_file,
        cert=device_files(broker.ca, broker.work, "cam-0002")[:2],
        client_id="cam-0002",
    )
    three = device_files(broker.ca, broker.work, "cam-0003")

    try:
        # Execute
        impostor = connect(broker.device_port, broker.ca_file, cert=three[:2], client_id="cam-0002")
        as_victim = publish(impostor, device_topic("cam-0002", MessageKind.STATUS))

        # Assert: it is cam-0003 (its client id replaced by its CN), cam-0002 stays connected
        assert not impostor.refused and as_victim == NOT_AUTHORIZED
        assert publish(impostor, device_topic("cam-0003", MessageKind.STATUS)) < 0x80  # a success code
        assert victim.paho.is_connected()
    finally:
        close(victim, impostor)


def test_no_certificate_another_cas_or_an_expired_one_is_refused(broker: Broker) -> None:
    # Prepare: another CA's certificate for a real device id, and an expired one of the fleet CA
    stranger = device_files(FleetCA.open(broker.work / "another-ca"), broker.work / "stranger", "cam-0004")
    expired = device_files(
        broker.ca, broker.work / "expired", "cam-0005", days=1, now=datetime.now(UTC) - timedelta(days=3)
    )

    before = refusals(broker)

    # Execute
    refused = [
        connect(broker.device_port, broker.ca_file, client_id="cam-0006"),
        connect(broker.device_port, broker.ca_file, cert=stranger[:2], client_id="cam-0004"),
        connect(broker.device_port, broker.ca_file, cert=expired[:2], client_id="cam-0005"),
        connect(broker.device_port, broker.ca_file, client_id="cam-0006", login=("cam-0006", "a password")),
    ]

    # Assert: each refused by the TLS handshake, for the reason the broker logged
    assert all(client.refused for client in refused), [c.refused for c in refused]
    assert refusals(broker) - before == Counter({VERIFY_FAILED: 2, NO_CERTIFICATE: 2})


def test_a_claim_certificate_cannot_log_in_let_alone_publish_as_a_device(broker: Broker) -> None:
    # Prepare: a batch's claim (device images enrol with it, over HTTPS only), its CN a device id too
    claims = FleetCA.open(broker.work / "claim-ca", name=CLAIM_CA_NAME)
    key, issued = claims.issue_claim("cam-0010")
    (broker.work / "claim.key").write_bytes(key)
    (broker.work / "claim.pem").write_text(issued.pem)
    before = refusals(broker)

    # Execute
    claim = connect(
        broker.device_port,
        broker.ca_file,
        cert=(broker.work / "claim.pem", broker.work / "claim.key"),
        client_id="claim-cam-0010",
    )

    # Assert: the broker does not trust the claim CA: refused by the handshake, nothing published
    assert claim.refused and not claim.connected.is_set()
    assert refusals(broker) - before == Counter({VERIFY_FAILED: 1})


def test_a_revoked_certificate_is_refused_once_the_broker_reloads_its_crl(broker: Broker) -> None:
    # Prepare: cam-0007 connects fine
    cert, key, serial = device_files(broker.ca, broker.work, "cam-0007")
    before = connect(broker.device_port, broker.ca_file, cert=(cert, key), client_id="cam-0007")
    assert not before.refused, before.refused
    close(before)

    # Execute: revoked; the CRL rewritten and reloaded
    refused_before = refusals(broker)
    broker.ca.write_crl([(serial, datetime.now(UTC))])
    reload(broker)
    after = connect(broker.device_port, broker.ca_file, cert=(cert, key), client_id="cam-0007")
    other = connect(
        broker.device_port,
        broker.ca_file,
        cert=device_files(broker.ca, broker.work, "cam-0008")[:2],
        client_id="cam-0008",
    )

    # Assert: refused; a device not revoked still gets in
    try:
        assert after.refused and refusals(broker) - refused_before == Counter({VERIFY_FAILED: 1})
        assert not other.refused, other.refused
    finally:
        close(other)
        broker.ca.write_crl([])
        reload(broker)
