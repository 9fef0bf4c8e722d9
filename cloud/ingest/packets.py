"""The bytes of the MQTT packets the ingest's link (link.py) reads and writes: fixed headers, variable
byte integers, strings and MQTT 5 properties (MQTT 5.0 sections 1.5 and 2.2)."""

import struct

from cloud.exceptions import LinkError
from wire.errors import shown

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
MAX_PACKET = 268_435_460  # the largest packet MQTT can frame: a four-byte length and its header

# MQTT 5 properties by identifier: how each value is encoded.
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _FOUR,
    0x12: _UTF8, 0x13: _TWO, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE, 0x18: _FOUR, 0x19: _BYTE,
    0x1A: _UTF8, 0x1C: _UTF8, 0x1F: _UTF8, 0x21: _TWO, 0x22: _TWO, 0x23: _TWO, 0x24: _BYTE,
    0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
SESSION_EXPIRY_INTERVAL, SERVER_KEEP_ALIVE, REASON_STRING = 0x11, 0x13, 0x1F
RECEIVE_MAXIMUM, MAXIMUM_PACKET_SIZE = 0x21, 0x27

Properties = dict[int, int | str | bytes]


def varint(value: int) -> bytes:
    """`value` as a variable byte integer."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def varint_at(data: bytes | bytearray, offset: int) -> tuple[int, int]:
    """The variable byte integer at `offset` and the offset after it. IndexError when `data` ends
    inside it; LinkError when it runs over four bytes (MQTT's limit)."""
    value = 0
    for shift in (0, 7, 14, 21):
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
    raise LinkError("malformed variable byte integer (more than four bytes)")


def properties_at(data: bytes, offset: int) -> tuple[Properties, int]:
    """The MQTT 5 properties at `offset` (a length, then identifier-value pairs) and the offset after
    them; user properties are dropped. LinkError when they are malformed."""
    try:
        length, offset = varint_at(data, offset)
        end = offset + length
        found: Properties = {}
        while offset < end:
            identifier, offset = data[offset], offset + 1
            kind = _PROPERTY_TYPES.get(identifier)
            if kind is None:
                raise LinkError(f"unknown MQTT 5 property 0x{identifier:02x}")
            value: int | str | bytes
            if kind == _BYTE:
                value, offset = data[offset], offset + 1
            elif kind == _TWO:
                (value,), offset = struct.unpack_from("!H", data, offset), offset + 2
            elif kind == _FOUR:
                (value,), offset = struct.unpack_from("!I", data, offset), offset + 4
            elif kind == _VARINT:
                value, offset = varint_at(data, offset)
            else:
                raw = b""
                for _ in range(2 if kind == _PAIR else 1):
                    (size,) = struct.unpack_from("!H", data, offset)
                    raw, offset = bytes(data[offset + 2 : offset + 2 + size]), offset + 2 + size
                value = raw.decode("utf-8", errors="replace") if kind == _UTF8 else raw
            if offset > end or end > len(data):
                raise IndexError
            if kind != _PAIR:
                found[identifier] = value
        return found, end
    except (IndexError, struct.error):
        raise LinkError("malformed MQTT 5 properties") from None


def int_property(properties: Properties, identifier: int, default: int) -> int:
    """An integer property's value, or `default` when the packet did not carry it."""
    value = properties.get(identifier, default)
    return value if isinstance(value, int) else default


def reason_of(properties: Properties) -> str:
    """The broker's reason string as a suffix of an error message ("" when it gave none)."""
    reason = properties.get(REASON_STRING)
    return f": {shown(reason, 200)}" if isinstance(reason, str) else ""


def string(text: str | bytes) -> bytes:
    """A length-prefixed string."""
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def packet(kind: int, flags: int, body: bytes) -> bytes:
    """A whole packet: fixed header, remaining length, body."""
    return bytes([kind << 4 | flags]) + varint(len(body)) + body
