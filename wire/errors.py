"""The one exception the wire contract raises, and how a validation failure is put into words."""

from pydantic import ValidationError


class ContractError(ValueError):
    """A message, topic or embedded array does not satisfy the wire contract; the text says why."""


def describe(exc: ValidationError) -> str:
    """`field.path: reason` for the first invalid field."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{where}: {first['msg']}"
