"""wire.device_topic / parse_device_topic: the only spelling of a topic, and strict parsing of it."""

from __future__ import annotations

import pytest

from wire import ContractError, MessageKind, device_topic, parse_device_topic

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
