"""Operator API keys: random bearer tokens with a role; only their SHA-256 is stored."""

import secrets
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from cloud.exceptions import NotFoundError
from cloud.registry.common import hash_secret, new_secret
from cloud.registry.tables import ApiKey, Role, utcnow

PREFIX = "drk"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # write last_used_at at most once a minute per key


def create_key(session: Session, *, role: Role, name: str = "") -> tuple[ApiKey, str]:
    """A new key; the plaintext is returned once and never stored."""
    key_id = secrets.token_hex(6)
    plaintext = f"{PREFIX}_{key_id}_{new_secret()}"
    row = ApiKey(id=key_id, name=name, role=role, key_hash=hash_secret(plaintext))
    session.add(row)
    return row, plaintext


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The active key with this plaintext, or None. Lookup is by hash, so timing reveals nothing."""
    if not plaintext.startswith(f"{PREFIX}_") or len(plaintext) > 128:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(plaintext)))
    if row is None or not row.active:
        return None
    return row


def needs_touch(row: ApiKey) -> bool:
    """Whether the key's last_used_at is older than its resolution (so it is worth a write)."""
    return row.last_used_at is None or utcnow() - row.last_used_at > LAST_USED_RESOLUTION


def touch(session: Session, key_id: str) -> None:
    """Record that a key was used now, unless another request already did within the resolution."""
    now = utcnow()
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .where(or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION))
        .values(last_used_at=now)
    )


def deactivate(session: Session, key_id: str) -> ApiKey:
    """Revoke a key; requests bearing it get 401 from now on."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFoundError("api key", key_id)
    row.active = False
    return row
