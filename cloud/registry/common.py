"""Helpers every registry module uses: pagination with totals, secrets and their hashes."""

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Row, Select, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

T = TypeVar("T")


def paginate(session: Session, statement: Select[T], *, limit: int, offset: int) -> tuple[Sequence[T], int]:
    """One page of `statement`'s rows and the total number of rows it matches, in one round trip.

    The total is an uncorrelated scalar subquery, which the database computes once per query; a
    `count(*) OVER ()` window would materialise every matching row instead (PostgreSQL, 10,000
    devices: 5.9 ms against 0.8 + 1.3 ms). Only a page past the end needs a second query.
    """
    rows, total = _page(session, statement, limit=limit, offset=offset)
    return [row[0] for row in rows], total


def paginate_rows(
    session: Session, statement: Select[Any], *, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """`paginate` for a statement of columns: each row as a dict by column name."""
    rows, total = _page(session, statement, limit=limit, offset=offset)
    return [{k: v for k, v in row._mapping.items() if k != TOTAL} for row in rows], total


TOTAL = "total_matching_rows"


def _page(
    session: Session, statement: Select[Any], *, limit: int, offset: int
) -> tuple[Sequence[Row[Any]], int]:
    total = select(func.count()).select_from(statement.order_by(None).subquery()).scalar_subquery()
    rows = session.execute(statement.add_columns(total.label(TOTAL)).limit(limit).offset(offset)).all()
    if rows:
        return rows, int(rows[0][-1])
    if offset == 0:
        return [], 0
    return [], int(session.scalar(select(total)) or 0)


def insert_new(session: Session, table: type[Any], rows: Sequence[dict[str, Any]], *, key: str) -> set[Any]:
    """Insert `rows`, skipping any whose unique `key` column is already stored (a redelivered message,
    or another ingest's); return the keys that were new. One statement, safe against racing writers."""
    if not rows:
        return set()
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    column = getattr(table, key)
    statement = insert(table).on_conflict_do_nothing(index_elements=[key]).returning(column)
    return set(session.scalars(statement, list(rows)).all())


def new_secret() -> str:
    """A credential with 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret: fast to check, and as safe as a slow hash for 256 random bits."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Whether `secret` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)
