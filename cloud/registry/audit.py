"""The audit log: every mutating call records who did what to which object."""

from typing import Any

from sqlalchemy.orm import Session

from cloud.registry.tables import AuditLog


def record(session: Session, *, actor: str, action: str, target: str = "", **detail: Any) -> AuditLog:
    """Add an audit entry to the caller's transaction, so it commits (or not) with the change."""
    entry = AuditLog(actor=actor, action=action, target=target, detail=detail)
    session.add(entry)
    return entry
