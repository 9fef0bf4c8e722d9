"""The one exception the wire contract raises, why a message was refused, and how a validation
failure is put into words."""

import enum

from pydantic import ValidationError


class Rejection(enum.StrEnum):
    """Why a received message was refused: a bounded set, so it can label a metric."""

    topic = "topic"  # not a device topic of the contract
    oversized = "oversized"
    not_json = "not_json"  # not UTF-8 JSON, or not an object, or NaN/Infinity
    schema = "schema"  # a `schema` other than the topic's
    device_mismatch = "device_mismatch"  # `device_id` other than the topic's
    invalid = "invalid"  # a field missing, of the wrong type or out of range
    refused = "refused"  # valid, but the registry will not take it (unknown or revoked device, ...)


class ContractError(ValueError):
    """A message, topic or embedded array does not satisfy the wire contract; the text says why."""

    def __init__(self, message: str, reason: Rejection = Rejection.invalid) -> None:
        super().__init__(message)
        self.reason = reason


def shown(text: str, limit: int = 120) -> str:
    """`text` as an error may quote it: control characters escaped, at most `limit` characters.

    Field names and values come from the sender; quoted whole they could flood or forge log lines.
    """
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def describe(exc: ValidationError) -> str:
    """`field.path: reason` for the first invalid field."""
    first = exc.errors()[0]
    where = ".".join(shown(str(p), 40) for p in first["loc"]) or "(top level)"
    return f"{shown(where)}: {shown(first['msg'])}"


class UnknownKeyError(ContractError):
    """A document signed by a key the verifier does not trust (yet: a trust update may bring it)."""
