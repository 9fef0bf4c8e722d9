"""JSON parsed strictly, for signed documents and request bodies."""

import json
from typing import Any

from wire.errors import ContractError, shown


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ContractError(f"duplicate key {shown(duplicate, 40)!r} in a JSON object")
    return dict(pairs)


def _refuse_constant(name: str) -> Any:
    raise ContractError(f"{name} is not a number JSON allows")


def strict_json(payload: bytes | str) -> Any:
    """Parse JSON refusing what a lenient parser lets through: duplicate keys (which one would a
    verifier and a reader each take?), NaN and Infinity, and bytes that are not UTF-8."""
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_refuse_constant)
    except ContractError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ContractError(f"not JSON: {shown(str(exc))}") from None
