"""The one exception the wire contract raises: a payload or topic that breaks the contract."""


class ContractError(ValueError):
    """A message, topic or embedded array does not satisfy the wire contract; the text says why."""
