"""Benchmark of telemetry retention: dropping the oldest days' partitions against deleting their rows.

Loads the same N rows (10,000,000 by default, spread evenly over 10 days, each with a small class
histogram) into two scratch PostgreSQL databases on loopback, server-side with INSERT ... SELECT
generate_series: one migrated to head (telemetry partitioned by day, migration 0012), one to 0011
(the plain table before it). After VACUUM ANALYZE of both, the registry's own `remove_expired`
removes the oldest 3 days from each: on the first it detaches and drops 3 daily partitions, on the
second it deletes their rows in batches of `PRUNE_BATCH`. Reports each one's time, the rows removed,
the tables' size (indexes included) before and after, and for the plain table its size after a
VACUUM (the deleted rows are at the head of the table: the space is reusable, not returned) and after
a VACUUM FULL (which returns it by rewriting the table under an exclusive lock), with their times,
and the WAL the server wrote during each step (server-wide: anything else running counts too).
Writes bench/results/telemetry_partitions.json; the databases are dropped afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from sqlalchemy import Engine, make_url, text
from sqlalchemy.orm import Session

from bench import harness
from cloud.registry import migrate, partitions, telemetry
from cloud.registry.db import make_engine
from testsupport.postgres import scratch_database

START = datetime(2026, 1, 1, tzinfo=UTC)  # a fixed window: `remove_expired` is given its `now`
MAX_ROWS = 50_000_000  # about 20 GB across both databases
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HISTOGRAM = '{"0": 412, "1": 37, "2": 3, "3": 120, "4": 9, "5": 61, "6": 2, "7": 88, "8": 17, "9": 5}'
# Every row's values follow from its number alone, so both databases hold the same rows.
LOAD = """
INSERT INTO telemetry (msg_id, device_id, at, model_id, uptime_s, inference_count, latency_p50_ms,
    latency_p95_ms, mean_confidence, labelled_count, accuracy, cpu_percent, mem_bytes, temp_c,
    class_histogram)
SELECT md5('bench-' || i)::uuid, 'bench-' || lpad((i % CAST(:devices AS bigint))::text, 7, '0'),
    CAST(:start AS timestamptz) + (i * CAST(:step_s AS float8)) * interval '1 second', 'home-cams.v3',
    (i % 86400)::float8, i * 7, 4.1, 7.9, 0.93, (i % 50)::int, 0.96, 23.5, 61234567, 48.5,
    CAST(:histogram AS json)
FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i
"""


@dataclass
class Variant:
    """One table's figures."""

    name: str
    rows_before: int = 0
    load_s: float = 0.0
    bytes_before: int = 0
    prune_s: float = 0.0
    rows_removed: int = 0  # for dropped partitions, ANALYZE's count
    partitions_dropped: int = 0
    rows_after: int = 0
    bytes_after: int = 0
    prune_wal_bytes: int = 0
    vacuum_s: float | None = None
    bytes_after_vacuum: int | None = None
    vacuum_full_s: float | None = None
    bytes_after_vacuum_full: int | None = None


def run(
    admin_url: str, *, rows: int, days: int, prune_days: int, devices: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """Load both databases, prune each, measure; the report."""
    now = START + timedelta(days=days)
    retention = timedelta(days=days - prune_days)
    variants = []
    for name, revision in (("partitioned by day", "head"), ("one table (before 0012)", "0011")):
        with scratch_database(admin_url, prefix="diredi_bench") as url, _engine(url) as engine:
            migrate.upgrade(engine, revision)
            variant = Variant(name)
            with Session(engine) as session:
                made = partitions.create(session, [(START + timedelta(days=d)).date() for d in range(days)])
            if made:
                say(f"{name}: made {len(made)} partitions")
            variant.load_s = _load(engine, rows=rows, days=days, devices=devices, say=say, label=name)
            say(f"{name}: VACUUM ANALYZE")
            _autocommit(engine, "VACUUM ANALYZE telemetry")
            variant.rows_before, variant.bytes_before = _count(engine), _size(engine)
            say(f"{name}: pruning the oldest {prune_days} days")
            wal = _wal(engine)
            with Session(engine) as session:
                began = time.perf_counter()
                pruned = telemetry.remove_expired(session, retention=retention, now=now)
                variant.prune_s = time.perf_counter() - began
            variant.prune_wal_bytes = _wal(engine) - wal
            variant.rows_removed, variant.partitions_dropped = pruned.rows, len(pruned.dropped)
            variant.rows_after, variant.bytes_after = _count(engine), _size(engine)
            if not pruned.dropped:
                say(f"{name}: VACUUM, then VACUUM FULL")
                variant.vacuum_s = _autocommit(engine, "VACUUM telemetry")
                variant.bytes_after_vacuum = _size(engine)
                variant.vacuum_full_s = _autocommit(engine, "VACUUM FULL telemetry")
                variant.bytes_after_vacuum_full = _size(engine)
            say(f"{name}: pruned in {variant.prune_s:.2f} s")
            variants.append(variant)
    return {
        "benchmark": "telemetry_partitions",
        "rows": rows,
        "days": days,
        "pruned_days": prune_days,
        "devices": devices,
        "prune_batch": telemetry.PRUNE_BATCH,
        "postgres": _server_version(admin_url),
        **harness.machine_keys(),
        "variants": [asdict(v) for v in variants],
    }


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _load(
    engine: Engine, *, rows: int, days: int, devices: int, say: Callable[[str], None], label: str
) -> float:
    """Insert the rows in time order, a day's worth per transaction; the seconds it took."""
    step_s = days * 86400 / rows
    per_day = -(-rows // days)
    began = time.perf_counter()
    for day in range(days):
        first, last = day * per_day, min(rows, (day + 1) * per_day) - 1
        params = {"devices": devices, "start": START, "step_s": step_s, "histogram": HISTOGRAM}
        params |= {"first": first, "last": last}
        with engine.begin() as connection:
            connection.execute(text(LOAD), params)
        say(f"{label}: loaded day {day + 1}/{days} ({last + 1:,} rows, {time.perf_counter() - began:.0f} s)")
    return time.perf_counter() - began


def _autocommit(engine: Engine, statement: str) -> float:
    """Run a statement outside a transaction (VACUUM must); the seconds it took."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        began = time.perf_counter()
        connection.execute(text(statement))
        return time.perf_counter() - began


def _count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM telemetry")).scalar_one())


def _size(engine: Engine) -> int:
    """Bytes of telemetry and its indexes, its partitions' included."""
    with engine.connect() as connection:
        found = connection.execute(
            text(  # a plain table is no partition tree
                "SELECT coalesce((SELECT sum(pg_total_relation_size(relid)) "
                "FROM pg_partition_tree('telemetry')), pg_total_relation_size('telemetry'))"
            )
        )
        return int(found.scalar_one())


def _wal(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar_one())


def _server_version(admin_url: str) -> str:
    with _engine(admin_url) as engine, engine.connect() as connection:
        return str(connection.execute(text("SHOW server_version")).scalar_one())


def print_table(report: dict[str, Any], console: Console) -> None:
    """One row per table: its size, the prune's time and what it removed, and the space returned."""
    table = harness.table(
        f"Telemetry retention: the oldest {report['pruned_days']} of {report['days']} days of "
        f"{report['rows']:,} rows, PostgreSQL {report['postgres']} ({report['cpus']} CPUs)",
        (
            "table",
            "load s",
            "size before",
            "prune s",
            "rows removed",
            "partitions",
            "WAL",
            "size after",
            "VACUUM s",
            "size after",
            "VACUUM FULL s",
            "size after",
        ),
        left=1,
    )
    for v in report["variants"]:
        table.add_row(
            v["name"],
            f"{v['load_s']:.0f}",
            _mb(v["bytes_before"]),
            f"{v['prune_s']:.2f}",
            f"{v['rows_removed']:,}",
            str(v["partitions_dropped"]),
            _mb(v["prune_wal_bytes"]),
            _mb(v["bytes_after"]),
            _s(v["vacuum_s"]),
            _mb(v["bytes_after_vacuum"]),
            _s(v["vacuum_full_s"]),
            _mb(v["bytes_after_vacuum_full"]),
        )
    console.print(table)


def _mb(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.1f} MB"


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    """Run, print, write JSON."""
    parser = harness.parser(__doc__, "telemetry_partitions")
    parser.add_argument("--rows", type=int, default=10_000_000, help=f"rows in each table (≤ {MAX_ROWS:,})")
    parser.add_argument("--days", type=int, default=10, help="days the rows are spread over")
    parser.add_argument("--prune-days", type=int, default=3, help="the oldest days pruned")
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args(argv)
    if not 0 < args.rows <= MAX_ROWS or not 0 < args.prune_days < args.days:
        parser.error(f"--rows must be 1 to {MAX_ROWS:,} and --prune-days fewer than --days")
    admin_url = harness.postgres_url()
    if make_url(admin_url).host not in LOOPBACK:
        raise SystemExit("the benchmark runs on a PostgreSQL on loopback only")
    console = Console(width=170)
    report = run(
        admin_url,
        rows=args.rows,
        days=args.days,
        prune_days=args.prune_days,
        devices=args.devices,
        say=console.print,
    )
    print_table(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
