"""Helpers every registry module uses: pagination with totals, secrets and their hashes."""

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Integer, Row, Select, bindparam, func, select
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


LIMIT, OFFSET = "page_limit", "page_offset"  # the bound parameters of a `RowPages` page


class RowPages:
    """Pages of a statement of columns, each row a dict by column name, with the total matching rows.

    Made once per statement shape, its filters as bound parameters, and kept: the page query (its total
    as in `paginate`) keeps its SQLAlchemy cache key and compiled form across calls, and each page runs
    on the session's connection (Core), without the ORM's per-execution steps. For the lists a fleet
    makes long, where building and running the statement anew cost more CPU than reading its rows.
    """

    def __init__(self, statement: Select[Any]) -> None:
        total = select(func.count()).select_from(statement.order_by(None).subquery()).scalar_subquery()
        self.names = list(statement.selected_columns.keys())
        self.page = (
            statement.add_columns(total.label(TOTAL))
            .limit(bindparam(LIMIT, type_=Integer()))
            .offset(bindparam(OFFSET, type_=Integer()))
        )
        self.total = select(total)

    def read(
        self, session: Session, *, limit: int, offset: int, params: dict[str, Any] | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """The page of `limit` rows from `offset` and the total, with `params` bound to the filters."""
        session.flush()  # Core execution skips the ORM's autoflush; a session with nothing pending is free
        connection = session.connection()
        rows = connection.execute(self.page, {**(params or {}), LIMIT: limit, OFFSET: offset}).all()
        if rows:
            # zip stops at the last listed column, before the total
            return [dict(zip(self.names, row, strict=False)) for row in rows], int(rows[0][-1])
        if offset == 0:
            return [], 0
        return [], int(connection.scalar(self.total, params or {}) or 0)


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
