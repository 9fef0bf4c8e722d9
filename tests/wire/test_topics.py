"""wire.device_topic / parse_device_topic / device_filter: the only spelling of a topic, strictly parsed."""

from __future__ import annotations

import pytest
from paho.mqtt.client import topic_matches_sub

from wire import (
    CLOUD_TOPICS,
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    ContractError,
    MessageKind,
    device_filter,
    device_topic,
    parse_device_topic,
)

VALID_IDS = ["dev-1", "abc", "0a-", "a" * 63, "pi-4b-kitchen-2"]
BAD_IDS = [
    "Dev-1",
    "DEV1",
    "ab",
    "a",
    "",
    "dev+1",
    "+",
    "#",
    "dev#",
    "dev/1",
    "-dev",
    "dev 1",
    "dév-1",
    "dev-1\n",
    "a" * 64,
]


@pytest.mark.parametrize("kind", list(MessageKind))
@pytest.mark.parametrize("device_id", VALID_IDS)
def test_round_trip_for_every_kind(device_id: str, kind: MessageKind) -> None:
    # Execute
    topic = device_topic(device_id, kind)

    # Assert
    assert topic == f"diredi/v1/dev/{device_id}/{kind.value}"
    assert parse_device_topic(topic) == (device_id, kind)


def test_every_kind_has_a_distinct_topic() -> None:
    # Execute
    topics = {device_topic("dev-1", kind) for kind in MessageKind}

    # Assert
    assert len(topics) == len(MessageKind)


@pytest.mark.parametrize("device_id", BAD_IDS)
def test_device_topic_refuses_a_bad_device_id(device_id: str) -> None:
    # Execute / Assert
    with pytest.raises(ContractError, match="device_id"):
        device_topic(device_id, MessageKind.STATUS)


@pytest.mark.parametrize("device_id", [i for i in BAD_IDS if "/" not in i])
def test_parse_refuses_a_bad_device_id(device_id: str) -> None:
    # Prepare
    topic = f"diredi/v1/dev/{device_id}/status"

    # Execute / Assert
    with pytest.raises(ContractError, match="device_id"):
        parse_device_topic(topic)


def test_parse_refuses_a_device_id_with_a_slash() -> None:
    # Prepare: the slash splits the id, leaving "1/status" as an unknown suffix.
    topic = "diredi/v1/dev/dev/1/status"

    # Execute / Assert
    with pytest.raises(ContractError):
        parse_device_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "diredi/v2/dev/dev-1/status",
        "diredi/v1/devs/dev-1/status",
        "diredi/v1/dev-1/status",
        "/diredi/v1/dev/dev-1/status",
        "DIREDI/v1/dev/dev-1/status",
        "other/dev-1/status",
        "diredi/v1/dev",
        "",
    ],
)
def test_parse_refuses_a_wrong_prefix(topic: str) -> None:
    # Execute / Assert
    with pytest.raises(ContractError, match="is not under"):
        parse_device_topic(topic)


@pytest.mark.parametrize(
    "suffix",
    ["telemetry", "model", "model/", "model/ack/extra", "STATUS", "status/", "status\n", "", "+", "#"],
)
def test_parse_refuses_an_unknown_suffix(suffix: str) -> None:
    # Prepare
    topic = f"diredi/v1/dev/dev-1/{suffix}"

    # Execute / Assert
    with pytest.raises(ContractError, match="unknown suffix"):
        parse_device_topic(topic)


def test_parse_refuses_a_topic_without_a_suffix() -> None:
    # Prepare
    topic = "diredi/v1/dev/dev-1"

    # Execute / Assert
    with pytest.raises(ContractError, match="unknown suffix"):
        parse_device_topic(topic)


@pytest.mark.parametrize("topic", ["diredi/v1/dev/+/status", "diredi/v1/dev/#", "diredi/v1/dev/+/#"])
def test_parse_refuses_subscription_wildcards(topic: str) -> None:
    # Execute / Assert
    with pytest.raises(ContractError):
        parse_device_topic(topic)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_device_filter_matches_that_kind_of_every_device_and_nothing_else(kind: MessageKind) -> None:
    # Execute
    topic_filter = device_filter(kind)

    # Assert
    assert topic_filter == f"diredi/v1/dev/+/{kind.value}"
    for device_id in VALID_IDS:
        for other in MessageKind:
            matches = topic_matches_sub(topic_filter, device_topic(device_id, other))
            assert matches == (other is kind)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_device_filter_with_a_shared_group_is_an_mqtt5_shared_subscription(kind: MessageKind) -> None:
    # Execute
    shared = device_filter(kind, shared_group="ingest")

    # Assert: $share/<group>/<the same filter>, so each message goes to one member of the group
    assert shared == f"$share/ingest/diredi/v1/dev/+/{kind.value}"
    assert shared.removeprefix("$share/ingest/") == device_filter(kind)


def test_device_filter_without_a_group_is_not_shared() -> None:
    # Execute
    plain = [device_filter(kind, shared_group=None) for kind in MessageKind]

    # Assert
    assert all(not f.startswith("$share/") for f in plain)
    assert len(set(plain)) == len(MessageKind)


def test_device_publishes_and_subscribes_partition_the_kinds() -> None:
    # Execute
    publishes, subscribes = set(DEVICE_PUBLISHES), set(DEVICE_SUBSCRIBES)

    # Assert
    assert len(publishes) == len(DEVICE_PUBLISHES) and len(subscribes) == len(DEVICE_SUBSCRIBES)
    assert publishes.isdisjoint(subscribes)
    assert publishes | subscribes == set(MessageKind)
    assert publishes == {
        MessageKind.PRESENCE,
        MessageKind.STATUS,
        MessageKind.KNOWLEDGE,
        MessageKind.MODEL_ACK,
        MessageKind.CMD_RESULT,
    }
    assert subscribes == {MessageKind.MODEL_DESIRED, MessageKind.RECEIPT, MessageKind.CMD}


@pytest.mark.parametrize("kind", list(MessageKind))
def test_cloud_topics_cover_every_device_topic(kind: MessageKind) -> None:
    # Execute / Assert
    assert CLOUD_TOPICS == "diredi/v1/#"
    assert all(topic_matches_sub(CLOUD_TOPICS, device_topic(d, kind)) for d in VALID_IDS)
    assert not topic_matches_sub(CLOUD_TOPICS, "$SYS/broker/uptime")
    assert not topic_matches_sub(CLOUD_TOPICS, "diredi/v2/dev/dev-1/status")


@pytest.mark.parametrize("group", ["", "a/b", "+", "#", "x" * 65, "ingest group"])
def test_a_shared_group_that_mqtt_cannot_carry_is_refused(group: str) -> None:
    # Execute / Assert
    with pytest.raises(ContractError, match="shared subscription group"):
        device_filter(MessageKind.STATUS, shared_group=group)
