"""The MQTT codec of the ingest's link: variable byte integers, MQTT 5 properties, strings, packets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.exceptions import LinkError
from cloud.ingest.packets import (
    PUBACK,
    PUBLISH,
    REASON_STRING,
    Properties,
    int_property,
    packet,
    properties_at,
    reason_of,
    string,
    varint,
    varint_at,
)

# Identifiers by how their value is encoded (MQTT 5.0, 2.2.2.2); 0x26 is the user property (a pair).
BYTES, TWOS, FOURS = (
    (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A),
    (0x13, 0x21, 0x22, 0x23),
    (0x02, 0x11, 0x18, 0x27),
)
VARINTS, UTF8S, BINARIES = (0x0B,), (0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F), (0x09, 0x16)  # fmt: skip
KNOWN = frozenset((*BYTES, *TWOS, *FOURS, *VARINTS, *UTF8S, *BINARIES, 0x26))


def encoded(identifier: int, value: int | str | bytes) -> bytes:
    """One property as MQTT 5 writes it, encoded here independently of the codec under test."""
    if identifier in BYTES:
        assert isinstance(value, int)
        return bytes([identifier, value])
    if identifier in TWOS or identifier in FOURS:
        assert isinstance(value, int)
        return bytes([identifier]) + struct.pack("!H" if identifier in TWOS else "!I", value)
    if identifier in VARINTS:
        assert isinstance(value, int)
        return bytes([identifier]) + varint(value)
    raw = value.encode() if isinstance(value, str) else value
    assert isinstance(raw, bytes)
    return bytes([identifier]) + struct.pack("!H", len(raw)) + raw


def block(*properties: bytes) -> bytes:
    """Properties with their length in front."""
    body = b"".join(properties)
    return varint(len(body)) + body


# Variable byte integers ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_a_varint_round_trips_at_every_length_boundary(value: int, wire: bytes) -> None:
    encoded_value = varint(value)

    assert encoded_value == wire
    assert varint_at(encoded_value, 0) == (value, len(wire))
    assert varint_at(b"\xaa" + wire + b"\xbb", 1) == (value, 1 + len(wire))  # at an offset, data after


@given(st.integers(min_value=0, max_value=268_435_455))
def test_every_varint_mqtt_can_frame_round_trips(value: int) -> None:
    wire = varint(value)

    assert varint_at(wire, 0) == (value, len(wire))
    assert 1 <= len(wire) <= 4


@pytest.mark.parametrize("data", [b"", b"\x80", b"\xff\xff", b"\xff\xff\xff"])
def test_a_varint_cut_short_raises_index_error(data: bytes) -> None:
    with pytest.raises(IndexError):
        varint_at(data, 0)


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff\x01", b"\x80\x80\x80\x80"])
def test_a_varint_over_four_bytes_raises_link_error(data: bytes) -> None:
    with pytest.raises(LinkError, match="more than four bytes"):
        varint_at(data, 0)


# MQTT 5 properties ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"\x01\x01", {0x01: 1}),  # byte: Payload Format Indicator
        (b"\x21\x00\x0a", {0x21: 10}),  # two bytes: Receive Maximum
        (b"\x11\x00\x01\x51\x80", {0x11: 86_400}),  # four bytes: Session Expiry Interval
        (b"\x0b\x80\x01", {0x0B: 128}),  # variable byte integer: Subscription Identifier
        (b"\x1f\x00\x03h\xc3\xa9", {0x1F: "hé"}),  # UTF-8 string: Reason String
        (b"\x09\x00\x02\x00\xff", {0x09: b"\x00\xff"}),  # binary data: Correlation Data
        (b"\x26\x00\x01k\x00\x01v", {}),  # string pair: User Property, dropped
    ],
)
def test_properties_at_reads_each_kind_of_value(wire: bytes, expected: Properties) -> None:
    assert properties_at(block(wire), 0) == (expected, 1 + len(wire))


def test_properties_at_reads_several_from_an_offset_and_stops_at_their_length() -> None:
    props = block(b"\x13\x00\x05", b"\x26\x00\x01k\x00\x01v", b"\x1f\x00\x02no", b"\x27\x00\x00\x01\x00")
    data = b"\x20\x00" + props + b"\x13\x00\x09"  # a CONNACK's first bytes, then bytes not in the block

    found, end = properties_at(data, 2)

    assert found == {0x13: 5, 0x1F: "no", 0x27: 256}
    assert end == 2 + len(props)


def test_no_properties_is_a_zero_length() -> None:
    assert properties_at(b"\x00payload", 0) == ({}, 1)


def test_a_string_that_is_not_utf8_is_replaced_not_raised() -> None:
    found, _ = properties_at(block(b"\x1f\x00\x02\xff\xfe"), 0)

    assert found == {0x1F: "\ufffd\ufffd"}


FULL = [
    b"\x01\x01",
    b"\x21\x00\x0a",
    b"\x11\x00\x01\x51\x80",
    b"\x0b\x80\x01",
    b"\x1f\x00\x03h\xc3\xa9",
    b"\x09\x00\x02\x00\xff",
    b"\x26\x00\x01k\x00\x01v",
]


@pytest.mark.parametrize("wire", FULL)
def test_a_property_cut_short_raises_link_error(wire: bytes) -> None:
    for cut in range(1, len(wire)):
        short = wire[:cut]
        for data in (varint(cut) + short, varint(len(wire)) + short):  # the length agrees, or runs past
            with pytest.raises(LinkError, match="malformed MQTT 5 properties"):
                properties_at(data, 0)


@pytest.mark.parametrize("wire", FULL)
def test_a_length_that_ends_inside_a_property_raises_link_error(wire: bytes) -> None:
    data = varint(len(wire) - 1) + wire  # the bytes are there, but past the properties' end

    with pytest.raises(LinkError, match="malformed MQTT 5 properties"):
        properties_at(data, 0)


def test_an_unknown_property_raises_link_error() -> None:
    with pytest.raises(LinkError, match="unknown MQTT 5 property 0x7f"):
        properties_at(block(b"\x13\x00\x05", b"\x7f\x00"), 0)


def test_a_properties_length_over_four_bytes_raises_link_error() -> None:
    with pytest.raises(LinkError, match="more than four bytes"):
        properties_at(b"\xff\xff\xff\xff\x01", 0)


def test_an_offset_past_the_end_raises_link_error() -> None:
    with pytest.raises(LinkError, match="malformed MQTT 5 properties"):
        properties_at(b"\x00", 1)


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=70))
def test_properties_at_on_any_bytes_returns_or_raises_link_error(data: bytes, offset: int) -> None:
    try:
        found, end = properties_at(data, offset)
    except LinkError:
        return
    assert offset < end <= len(data)
    assert set(found) <= KNOWN - {0x26}


def known_property() -> st.SearchStrategy[tuple[int, int | str | bytes]]:
    def value_for(identifier: int) -> st.SearchStrategy[int | str | bytes]:
        if identifier in BYTES:
            return st.integers(0, 0xFF)
        if identifier in TWOS:
            return st.integers(0, 0xFFFF)
        if identifier in FOURS:
            return st.integers(0, 0xFFFF_FFFF)
        if identifier in VARINTS:
            return st.integers(0, 268_435_455)
        if identifier in UTF8S:
            return st.text(max_size=20)
        return st.binary(max_size=20)

    identifiers = st.sampled_from(sorted(KNOWN - {0x26}))
    return identifiers.flatmap(lambda i: st.tuples(st.just(i), value_for(i)))


@given(st.lists(known_property(), max_size=8), st.binary(max_size=8))
def test_properties_at_reads_back_what_was_written(
    properties: list[tuple[int, int | str | bytes]], after: bytes
) -> None:
    wire = block(*(encoded(i, v) for i, v in properties), b"\x26\x00\x01k\x00\x01v")

    found, end = properties_at(wire + after, 0)

    assert found == dict(properties)  # the last of a repeated identifier wins; the pair is dropped
    assert end == len(wire)


@given(st.lists(known_property(), min_size=1, max_size=4), st.data())
def test_properties_at_on_cut_or_corrupted_properties_returns_or_raises_link_error(
    properties: list[tuple[int, int | str | bytes]], data: st.DataObject
) -> None:
    wire = bytearray(block(*(encoded(i, v) for i, v in properties)))
    for _ in range(data.draw(st.integers(0, 3))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 0xFF))
    cut = data.draw(st.integers(0, len(wire)))

    try:
        properties_at(bytes(wire[:cut]), 0)
    except LinkError:
        pass


# Strings, packets, and what link.py takes from properties ------------------------------------------
def test_string_puts_the_length_in_front_of_the_utf8() -> None:
    assert string("hé") == b"\x00\x03h\xc3\xa9"
    assert string(b"\xff") == b"\x00\x01\xff"
    assert string("") == b"\x00\x00"


def test_packet_frames_the_body_with_type_flags_and_length() -> None:
    assert packet(PUBACK, 0, b"\x00\x05") == b"\x40\x02\x00\x05"
    assert packet(PUBLISH, 0x0A, b"x" * 200) == b"\x3a\xc8\x01" + b"x" * 200
    assert packet(12, 0, b"") == b"\xc0\x00"


def test_int_property_falls_back_when_absent_or_not_an_int() -> None:
    properties: Properties = {0x13: 5, 0x1F: "text"}

    assert int_property(properties, 0x13, 30) == 5
    assert int_property(properties, 0x21, 65_535) == 65_535
    assert int_property(properties, 0x1F, 7) == 7


def test_reason_of_quotes_the_reason_string_short_and_escaped() -> None:
    assert reason_of({}) == ""
    assert reason_of({REASON_STRING: "not authorised"}) == ": not authorised"
    assert reason_of({REASON_STRING: "a\nb"}) == ": a\\nb"
    assert len(reason_of({REASON_STRING: "x" * 1000})) == len(": ") + 200
