"""Helpers every registry module uses: pagination with totals, secrets and their hashes, driver errors."""

import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC
from typing import Any, TypeVar

from sqlalchemy import Dialect, Integer, PoolProxiedConnection, Row, Select, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

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
    as in `paginate`) keeps its SQLAlchemy cache key and compiled form across calls. `read` runs a page
    on a session's connection (Core, without the ORM's per-execution steps); `read_async`, for the API's
    event loop, runs it on psycopg's own cursor when it can. For the lists a fleet makes long, where
    SQLAlchemy's execution of the statement cost more CPU than the database's work.
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
        self._compiled: dict[type[Dialect], _DriverStatement] = {}

    def read(
        self, session: Session, *, limit: int, offset: int, params: dict[str, Any] | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """The page of `limit` rows from `offset` and the total, with `params` bound to the filters."""
        session.flush()  # Core execution skips the ORM's autoflush; a session with nothing pending is free
        connection = session.connection()
        rows = connection.execute(self.page, {**(params or {}), LIMIT: limit, OFFSET: offset}).all()
        if rows:
            return self._dicts(rows), int(rows[0][-1])
        if offset == 0:
            return [], 0
        return [], int(connection.scalar(self.total, params or {}) or 0)

    async def read_async(
        self, engine: AsyncEngine, *, limit: int, offset: int, params: dict[str, Any] | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """`read` on an asynchronous engine, on the event loop.

        On PostgreSQL the page runs on psycopg's asynchronous cursor, on a connection from the engine's
        pool, and its rows are psycopg's values: no session, no greenlet hop, no SQLAlchemy type
        conversion (select columns whose driver value is what the caller wants: `devices.LISTED` reads
        enums as text). Errors are SQLAlchemy's all the same (`sqlalchemy_errors`). A connection whose time
        zone is not UTC (psycopg gives times in it), another database, or a page past the end (its total
        needs a second query) goes through `read` in a session.
        """
        if engine.dialect.driver == "psycopg":
            pooled = await engine.raw_connection()  # a Connection around it cost 0.05 ms a page
            try:
                psycopg = pooled.driver_connection  # a psycopg.AsyncConnection
                if psycopg is not None and _speaks_utc(psycopg):
                    bound = {**(params or {}), LIMIT: limit, OFFSET: offset}
                    rows = await self._on_psycopg(engine.dialect, pooled, psycopg, bound)
                    if rows:
                        return self._dicts(rows), int(rows[0][-1])
                    if offset == 0:
                        return [], 0
            finally:
                await greenlet_spawn(pooled.close)  # back to the pool, whose reset awaits the driver
        async with AsyncSession(engine) as session:
            return await session.run_sync(lambda s: self.read(s, limit=limit, offset=offset, params=params))

    def _dicts(self, rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
        # zip stops at the last listed column, before the total
        return [dict(zip(self.names, row, strict=False)) for row in rows]

    async def _on_psycopg(
        self, dialect: Dialect, pooled: PoolProxiedConnection, psycopg: Any, bound: dict[str, Any]
    ) -> list[Any]:
        compiled = self._compiled.get(type(dialect))
        if compiled is None:
            compiled = self._compiled[type(dialect)] = _DriverStatement(self.page, dialect)
        parameters = compiled.parameters(bound)
        async with sqlalchemy_errors(dialect, pooled, compiled.sql, parameters):
            async with psycopg.cursor() as cursor:
                await cursor.execute(compiled.sql, parameters)
                rows: list[Any] = await cursor.fetchall()
                return rows


class _DriverStatement:
    """A statement compiled for `dialect`, with its parameters' conversions (the bind processors
    SQLAlchemy would apply: an enum to its value, a time to UTC), to run on the driver's cursor."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor

    def parameters(self, bound: dict[str, Any]) -> dict[str, Any]:
        """`bound` as the driver is to receive them."""
        processors = self.processors
        return {
            name: processors[name](value) if name in processors else value for name, value in bound.items()
        }


def _speaks_utc(psycopg: Any) -> bool:
    # psycopg gives timestamps with time zone in the connection's time zone: its values are those of
    # SQLAlchemy's UTC type only when that zone is UTC (PostgreSQL's default in most setups).
    zone = psycopg.info.timezone
    return zone is UTC or getattr(zone, "key", None) in UTC_ZONES


UTC_ZONES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "Etc/Universal", "Etc/Zulu", "UCT", "Universal", "Zulu"})


@contextmanager
def driver_errors(
    dialect: Dialect, pooled: PoolProxiedConnection, statement: str, parameters: Any = None
) -> Iterator[None]:
    """Raise what SQLAlchemy would have for a driver error in the block (IntegrityError, DataError,
    OperationalError...), for work done on the driver's own connection below SQLAlchemy: callers, and
    the API's problem responses, handle one kind of exception on every path. A connection the error
    shows lost is invalidated, as SQLAlchemy does, so the pool does not hand it out again."""
    error = dialect.loaded_dbapi.Error
    try:
        yield
    except error as exc:
        lost = dialect.is_disconnect(exc, pooled, None)
        if lost:
            pooled.invalidate(exc)
        raise _translated(dialect, statement, parameters, exc, lost) from exc


@asynccontextmanager
async def sqlalchemy_errors(
    dialect: Dialect, pooled: PoolProxiedConnection, statement: str, parameters: Any = None
) -> AsyncIterator[None]:
    """`driver_errors` for an async driver connection."""
    error = dialect.loaded_dbapi.Error
    try:
        yield
    except error as exc:
        lost = dialect.is_disconnect(exc, pooled, None)
        if lost:
            await greenlet_spawn(pooled.invalidate, exc)  # closing it awaits the driver
        raise _translated(dialect, statement, parameters, exc, lost) from exc


def _translated(
    dialect: Dialect, statement: str, parameters: Any, exc: Exception, lost: bool
) -> StatementError:
    return DBAPIError.instance(
        statement,
        parameters,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=lost,
        dialect=dialect,
    )


def insert_new(
    session: Session,
    table: type[Any],
    rows: Sequence[dict[str, Any]],
    *,
    key: str,
    unique: Sequence[str] | None = None,
) -> set[Any]:
    """Insert `rows`, skipping any whose unique columns (`unique`, by default `key` alone) are already
    stored (a redelivered message, or another ingest's); return the `key`s that were new. One
    statement, safe against racing writers."""
    if not rows:
        return set()
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    column = getattr(table, key)
    conflict = list(unique or [key])
    statement = insert(table).on_conflict_do_nothing(index_elements=conflict).returning(column)
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
