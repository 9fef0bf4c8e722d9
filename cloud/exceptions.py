"""Errors of the cloud package, under one base class; the CLI turns them into clear messages."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path


class CloudError(Exception):
    """Base class of every error the cloud raises on purpose."""


class ScenarioError(CloudError):
    """A scenario file is missing, not JSON, or breaks the format; the text names the field."""


class DataError(ScenarioError):
    """A data source (a built-in name, an `.npz`, an image folder) cannot be read as labelled samples;
    the text names the file or field."""


class FamilyError(CloudError):
    """A model family cannot be built or breaks the contract (docs/model-families.md); one line says why."""


class ExportError(CloudError):
    """An edge model could not be exported, or its int8 accuracy fell too far below float."""


@dataclass(frozen=True)
class ExportAttempt:
    """One try of the guarded export: how it quantized, float and int8 accuracy, and the verdict."""

    method: str
    float_acc: float
    int8_acc: float
    accepted: bool
    seconds: float = 0.0  # time the attempt took

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready record."""
        return {
            "method": self.method,
            "float_acc": self.float_acc,
            "int8_acc": self.int8_acc,
            "accepted": self.accepted,
            "seconds": round(self.seconds, 3),
        }


class ExportGaveUp(ExportError):
    """No way of quantizing the model kept int8 accuracy within the limit; `attempts` holds each try."""

    def __init__(self, attempts: list[ExportAttempt], max_drop: float) -> None:
        tried = ", ".join(f"{a.method} {a.int8_acc:.4f} vs float {a.float_acc:.4f}" for a in attempts)
        super().__init__(f"int8 export gave up after {len(attempts)} attempts (limit {max_drop}): {tried}")
        self.attempts = attempts
        self.max_drop = max_drop


class KnowledgeError(CloudError):
    """Knowledge reports cannot be used: wrong base model, shape, or nothing usable."""


class RegistryError(CloudError):
    """A registry operation that cannot be done as asked."""


class NotFoundError(RegistryError):
    """The named row does not exist."""

    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key!s} not found")
        self.kind = kind
        self.key = key


class ConflictError(RegistryError):
    """The operation conflicts with the current state (a duplicate id, a wrong status)."""


class InvalidValueError(RegistryError):
    """A value the caller gave breaks a rule the registry keeps (a label selector, too many labels)."""


class ArtifactStoreError(CloudError):
    """An artifact is missing, corrupt, or its address is not a sha256."""


class HookError(CloudError):
    """A provisioning hook failed; its message is safe to log and to show (it never holds a secret)."""


class InsecureFileError(CloudError):
    """A file or directory that holds secrets is open to other users; the text says how to fix it."""


class SigningError(CloudError):
    """A signing key is unusable or a signature does not verify."""


class LocalSystemError(CloudError):
    """The system could not start, or a part of it failed."""


class LocalSystemConfigError(LocalSystemError):
    """Options or settings that cannot work (a port in use, half a broker configuration); nothing was
    started."""


class ChildExited(LocalSystemError):
    """A part of the system exited while it should be running; the text names it and ends with the
    tail of its log."""

    def __init__(self, name: str, returncode: int, log_path: Path, tail: str) -> None:
        how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
        super().__init__(f"{name} exited unexpectedly ({how}); last lines of {log_path}:\n{tail}")
        self.name = name
        self.returncode = returncode
        self.log_path = log_path
        self.tail = tail


class FrontConfigError(CloudError):
    """A value for the nginx front's configuration (cloud/front.py) cannot be used; one line says which."""


class PublishError(CloudError):
    """The broker could not be reached, or did not acknowledge a message in time."""


class LeaseLost(RegistryError):
    """The job's lease went to another worker; this one's result is not registered."""


class DemoError(CloudError):
    """The demo could not run the loop to its end (a part failed, or it took too long)."""


class LinkError(CloudError, ConnectionError):
    """The connection failed, was refused, or broke; the text says which (never the password)."""
