"""Size limits of DESIGN §2, per message kind, in bytes of the encoded payload."""

from wire.topics import MessageKind

KIB = 1024
DEFAULT_MAX_PAYLOAD_BYTES = 16 * KIB
MAX_PAYLOAD_BYTES: dict[MessageKind, int] = {
    MessageKind.STATUS: 8 * KIB,
    MessageKind.KNOWLEDGE: 256 * KIB,
    # The longest detail escaped (6 KiB) and 16 values of 256 characters fit.
    MessageKind.CMD_RESULT: 16 * KIB,
}


def max_payload_bytes(kind: MessageKind) -> int:
    """The largest payload accepted for `kind`."""
    return MAX_PAYLOAD_BYTES.get(kind, DEFAULT_MAX_PAYLOAD_BYTES)
