"""Benchmark of the beat's periodic passes on a big registry: what one pass of `schedule_cycles`,
`advance_rollouts` and `reconcile_desired` costs the database when nothing changed, and when a few
things did.

Fills a scratch PostgreSQL database on loopback (migrated to head) server-side with INSERT ... SELECT
generate_series: N devices (`--devices`, 10,000 and 100,000 by default), half in one big cohort
(`fleet`) and half in cohorts of 4 (one home each). Every home has its v1 rolled out (a completed
cohort-wide rollout), as has the fleet, which has a cohort-wide rollout of v2 running: the canary
and the 1 % wave installed, the 10 % wave offered two minutes ago with a third of it installed.
Knowledge reports: 10 % of the devices have a consumed one (history), 1 % a received one waiting
behind an open RD cycle job (the fleet's, and those of 1 % of the homes).

Each task body of `cloud.worker.tasks` is then called in this process, on a one-connection pool,
with its publisher and its job queue replaced by counters: a first pass; after a VACUUM ANALYZE (the
statistics autovacuum keeps), a pass with nothing changed since (idle); a pass after a few
changes made by the registry's own writers (10 acks of the current wave, 5 new devices in homes, 5
knowledge reports in homes with no job), and an idle one again. For each pass: the SQL statements it
sent, the rows they returned or changed, the rows the server read for it (rows of sequential scans
and index entries, index-only scans included: `seq_tup_read` and `idx_tup_read` of its statistics
views) and the wall time. Writes bench/results/beat_passes.json; the database is dropped afterwards.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import Engine, event, inspect, make_url, text

from bench import harness
from cloud.artifacts import LocalArtifactStore
from cloud.pipeline.rollout_checks import RolloutPlan
from cloud.registry import acks, devices, knowledge, migrate
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.tables import utcnow
from cloud.settings import Settings
from cloud.signing import Desired
from cloud.worker import tasks
from testsupport.postgres import scratch_database
from testsupport.registry import knowledge_report, make_manifest
from wire.messages import AckResult, ModelAck

MAX_DEVICES = 2_000_000
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HOME_SIZE = 4
PLAN = RolloutPlan(canary=1, waves=[0.01, 0.1, 0.5, 1.0], observe_s=600, wave_timeout_s=900)
CURRENT_WAVE = 2  # the 10 % wave: offered, a third of it installed
TASKS = ("schedule_cycles", "advance_rollouts", "reconcile_desired")
CHANGES = {"acks": 10, "devices": 5, "reports": 5}


@dataclass
class Pass:
    """One pass of one task."""

    task: str
    case: str  # first, idle, changed
    statements: int
    rows_returned: int  # returned to the worker, or changed by its UPDATEs and INSERTs
    rows_read: int  # read by the server (sequential and index fetches), all tables
    ms: float
    result: Any  # what the task returned


@dataclass
class Fleet:
    """What was loaded."""

    devices: int
    cohorts: int
    rollout_targets: int
    received_reports: int
    current_wave: int
    load_s: float


# --- the registry -------------------------------------------------------------------------------------


def manifest(line: str, version: int) -> dict[str, Any]:
    """A valid manifest of a line's edge model (the passes publish it; no artifact is read)."""
    blob = f"{line}.v{version}".encode()
    return make_manifest(blob, line=line, version=version).model_dump(mode="json", by_alias=True)


def waves(fleet_size: int) -> list[tuple[int, int]]:
    """The fleet rollout's waves as [first, last) device numbers, as `PLAN.split` makes them."""
    numbers = [str(i) for i in range(fleet_size)]
    bounds, start = [], 0
    for wave in PLAN.split(numbers):
        bounds.append((start, start + len(wave)))
        start += len(wave)
    return bounds


def stages(bounds: Sequence[tuple[int, int]], now_s: float) -> dict[str, Any]:
    """The running rollout's plan document: the waves before the current one done long ago."""
    done = {"offered_at": _iso(now_s - 7200), "settled_at": _iso(now_s - 7000), "health": None}
    made = []
    for n, (first, last) in enumerate(bounds):
        stage: dict[str, Any] = {"size": last - first, "offered_at": None, "settled_at": None, "health": None}
        if n < CURRENT_WAVE:
            stage |= done
        elif n == CURRENT_WAVE:
            stage["offered_at"] = _iso(now_s - 120)
        made.append(stage)
    return {"plan": PLAN.model_dump(mode="json"), "stages": made}


# Every statement starts with the integers bound once, as int (psycopg would bind a small one as
# smallint, and the arithmetic on it overflow).
PARAMS = """WITH p AS (SELECT CAST(:fleet AS int) AS fleet, CAST(:homes AS int) AS homes,
    CAST(:home_size AS int) AS home_size, CAST(:current_start AS int) AS cur_start,
    CAST(:current_end AS int) AS cur_end, CAST(:current_wave AS int) AS cur_wave)
"""
LOAD = [
    # cohorts: the fleet, then the homes
    """INSERT INTO cohort (id, description, created_at)
       SELECT 'fleet', 'one site', now() UNION ALL
       SELECT 'home-' || lpad(i::text, 7, '0'), '', now() FROM p, generate_series(0, p.homes - 1) AS i""",
    # models: fleet v1 and v2, each home's v1; approved edge models
    """INSERT INTO model (id, cohort_id, kind, version, format, sha256, size, manifest, metrics, status,
           status_reason, created_at)
       SELECT m.id, m.cohort, 'edge', m.version, 'tflite-int8', repeat('a', 64), 1000,
           jsonb_set(jsonb_set(jsonb_set(CAST(:manifest AS jsonb), '{model_id}', to_jsonb(m.id)),
               '{line}', to_jsonb(m.cohort)), '{version}', to_jsonb(m.version)),
           '{}', 'approved', '', now() - interval '30 days'
       FROM (SELECT 'fleet.v' || v AS id, 'fleet' AS cohort, v AS version FROM generate_series(1, 2) AS v
             UNION ALL
             SELECT 'home-' || lpad(i::text, 7, '0') || '.v1', 'home-' || lpad(i::text, 7, '0'), 1
             FROM p, generate_series(0, p.homes - 1) AS i) AS m""",
    # devices: the fleet's run v2 up to the current wave (desired v2 in it), v1 after; each home's v1
    """INSERT INTO device (id, cohort_id, status, labels, desired_model_id, reported_model_id, presence,
           created_at)
       SELECT 'fleet-' || lpad(i::text, 7, '0'), 'fleet', 'active', CAST('{}' AS jsonb),
           CASE WHEN i < p.cur_end THEN 'fleet.v2' ELSE 'fleet.v1' END,
           CASE WHEN i < p.cur_start OR (i < p.cur_end AND i % 3 = 0) THEN 'fleet.v2' ELSE 'fleet.v1' END,
           'online', now() - interval '60 days'
       FROM p, generate_series(0, p.fleet - 1) AS i
       UNION ALL
       SELECT h.home || '-' || h.n, h.home, 'active', CAST('{}' AS jsonb), h.home || '.v1', h.home || '.v1',
           'online', now() - interval '60 days'
       FROM (SELECT 'home-' || lpad((i / p.home_size)::text, 7, '0') AS home, i % p.home_size AS n
             FROM p, generate_series(0, p.homes * p.home_size - 1) AS i) AS h""",
    # rollouts: every cohort's v1 (completed, long ago), the fleet's v2 (running)
    """INSERT INTO rollout (id, cohort_id, model_id, state, scope, waves, current_wave, reason, created_by,
           created_at, updated_at)
       SELECT md5('v1-' || c.id)::uuid, c.id, c.id || '.v1', 'completed', 'cohort', CAST('{}' AS jsonb), 0,
           '', 'bench', now() - interval '30 days', now() - interval '30 days'
       FROM cohort AS c
       UNION ALL
       SELECT md5('v2-fleet')::uuid, 'fleet', 'fleet.v2', 'running', 'cohort', CAST(:stages AS jsonb),
           p.cur_wave, '', 'bench', now() - interval '2 hours', now() - interval '2 minutes'
       FROM p""",
    """INSERT INTO rollout_target (rollout_id, device_id, wave, state, reason, updated_at)
       SELECT md5('v1-' || d.cohort_id)::uuid, d.id, 0, 'installed', '', now() - interval '30 days'
       FROM device AS d""",
    # the running rollout's targets: wave by device number; installed before the current wave, a third
    # of it installed, the rest offered; pending after it
    """INSERT INTO rollout_target (rollout_id, device_id, wave, state, reason, previous_model_id,
           updated_at)
       SELECT md5('v2-fleet')::uuid, 'fleet-' || lpad(i::text, 7, '0'),
           (SELECT count(*) FROM unnest(CAST(:wave_starts AS int[])) AS s WHERE s <= i) - 1,
           CASE WHEN i < p.cur_start OR (i < p.cur_end AND i % 3 = 0) THEN 'installed'
                WHEN i < p.cur_end THEN 'offered' ELSE 'pending' END,
           '', 'fleet.v1', now() - interval '2 minutes'
       FROM p, generate_series(0, p.fleet - 1) AS i""",
    # jobs: the fleet's RD cycle running, and those of 1 % of the homes
    """INSERT INTO job (id, type, cohort_id, state, progress, stage, params, result, error, attempts,
           created_at, started_at)
       SELECT md5('job-' || c.id)::uuid, 'rd_cycle', c.id, 'running', 0.5, 're-KD',
           '{"trigger": "knowledge"}', '{}', '', 1, now() - interval '1 minute', now() - interval '1 minute'
       FROM cohort AS c WHERE c.id = 'fleet' OR right(c.id, 2) = '00'""",
    # knowledge: 10 % of the devices have a consumed report; 1 % a received one behind their cohort's job
    """INSERT INTO knowledge_report (msg_id, device_id, base_model_id, schema, size_bytes, sample_count,
           metrics, status, status_reason, sent_at, received_at, payload)
       SELECT md5('kr-' || d.id)::uuid, d.id, d.cohort_id || '.v1', 'diredi.knowledge/1', 4, 40, '{}',
           CASE WHEN j.id IS NULL THEN 'consumed' ELSE 'received' END, '',
           now() - interval '10 minutes', now() - interval '10 minutes', '\\x00000000'
       FROM device AS d LEFT JOIN job AS j ON j.cohort_id = d.cohort_id
       WHERE (j.id IS NULL AND abs(hashtext(d.id)) % 10 = 0)
           OR (j.id IS NOT NULL AND (d.cohort_id <> 'fleet' OR abs(hashtext(d.id)) % 50 = 0))""",
]
# As migration 0013 leaves a registry it upgrades: the reports seen, but those waiting for a job.
NOTICED = "UPDATE knowledge_report SET noticed = status <> 'received'"


def load(engine: Engine, n: int, say: Callable[[str], None]) -> Fleet:
    """Fill the registry; what was loaded."""
    fleet = n // 2
    homes = (n - fleet) // HOME_SIZE
    bounds = waves(fleet)
    current_start, current_end = bounds[CURRENT_WAVE]
    params = {
        "homes": homes,
        "home_size": HOME_SIZE,
        "fleet": fleet,
        "current_start": current_start,
        "current_end": current_end,
        "current_wave": CURRENT_WAVE,
        "wave_starts": [first for first, _ in bounds],
        "manifest": json.dumps(manifest("fleet", 1)),
        "stages": json.dumps(stages(bounds, time.time())),
    }
    began = time.perf_counter()
    with engine.begin() as connection:
        for n_statement, statement in enumerate(LOAD, 1):
            connection.execute(text(PARAMS + statement), params)
            say(f"loaded {n_statement}/{len(LOAD)} ({time.perf_counter() - began:.0f} s)")
        if "noticed" in {c["name"] for c in inspect(connection).get_columns("knowledge_report")}:
            connection.execute(text(NOTICED))
    _autocommit(engine, "VACUUM ANALYZE")
    return Fleet(
        devices=_scalar(engine, "SELECT count(*) FROM device"),
        cohorts=_scalar(engine, "SELECT count(*) FROM cohort"),
        rollout_targets=_scalar(engine, "SELECT count(*) FROM rollout_target"),
        received_reports=_scalar(engine, "SELECT count(*) FROM knowledge_report WHERE status = 'received'"),
        current_wave=current_end - current_start,
        load_s=time.perf_counter() - began,
    )


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


def change(engine: Engine, now_s: float) -> None:
    """A few things change, by the registry's own writers: acks of the current wave, new devices in
    homes, knowledge reports in homes with no job."""
    sessions = session_factory(engine)
    fleet_size = _scalar(engine, "SELECT count(*) FROM device WHERE cohort_id = 'fleet'")
    first, last = waves(fleet_size)[CURRENT_WAVE]
    offered = [i for i in range(first, last) if i % 3 != 0][: CHANGES["acks"]]
    now = utcnow()
    with transaction(sessions) as session:
        acks.record_acks(
            session,
            [
                ModelAck(
                    device_id=f"fleet-{i:07d}",
                    model_id="fleet.v2",
                    result=AckResult.installed,
                    sent_at=now,
                    running_model_id="fleet.v2",
                )
                for i in offered
            ],
            received_at=now,
        )
    homes = [f"home-{i:07d}" for i in range(1, 1 + CHANGES["devices"])]
    with transaction(sessions) as session:
        for home in homes:
            devices.provision_device(session, device_id=f"{home}-new", cohort_id=home)
    with transaction(sessions) as session:
        for home in [f"home-{i:07d}" for i in range(11, 11 + CHANGES["reports"])]:
            knowledge.store_report(session, _report(f"{home}-0", f"{home}.v1"))


def _report(device_id: str, base_model_id: str) -> bytes:
    return knowledge_report(device_id, base_model_id, sent_at=utcnow() - timedelta(seconds=5), moves={})


# --- the passes ---------------------------------------------------------------------------------------


class CountingPublisher:
    """The worker's publisher, counting the desired models it is given."""

    def __init__(self) -> None:
        self.desired = 0

    def publish_desired_many(self, wanted: Sequence[Desired]) -> None:
        self.desired += len(wanted)


class Counter:
    """The statements an engine sends and the rows they return or change."""

    def __init__(self, engine: Engine) -> None:
        self.statements = self.rows = 0
        event.listen(engine, "after_cursor_execute", self._after)

    def _after(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        self.statements += 1
        self.rows += max(cursor.rowcount or 0, 0)


@contextmanager
def worker(engine: Engine, data_dir: Path) -> Iterator[list[uuid.UUID]]:
    """The tasks run on `engine` in this process; yields the job ids they would queue."""
    context = tasks._Context(
        settings=Settings(data_dir=data_dir),
        sessions=session_factory(engine),
        store=LocalArtifactStore(data_dir / "artifacts"),
        owner="bench",
        publisher_lock=threading.Lock(),
    )
    context.publisher = CountingPublisher()  # type: ignore[assignment]
    queued: list[uuid.UUID] = []
    saved = tasks.context, tasks.enqueue
    tasks.context, tasks.enqueue = (lambda: context), queued.append  # type: ignore[assignment]
    try:
        yield queued
    finally:
        tasks.context, tasks.enqueue = saved


def rows_read(stats: Engine) -> int:
    """Rows the server has read so far from the database's tables and indexes (its statistics, flushed):
    rows read by sequential scans, and index entries read (index-only scans included)."""
    with stats.connect() as connection:
        connection.execute(text("SELECT pg_stat_clear_snapshot()"))
        tables = connection.execute(text("SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables"))
        indexes = connection.execute(text("SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes"))
        return int(tables.scalar_one()) + int(indexes.scalar_one())


def one_pass(engine: Engine, stats: Engine, counter: Counter, task: str, case: str) -> Pass:
    """Run one task's body once and measure it."""
    run = getattr(tasks, task).run
    _flush(engine)  # what ran before (the changes) is not the pass's
    read_before = rows_read(stats)
    statements, rows = counter.statements, counter.rows
    began = time.perf_counter()
    result = run()
    ms = (time.perf_counter() - began) * 1000
    statements, rows = counter.statements - statements, counter.rows - rows
    _flush(engine)
    return Pass(task, case, statements, rows, rows_read(stats) - read_before, ms, _plain(result))


def _flush(engine: Engine) -> None:
    """Have the server count what the engine's one connection has read so far."""
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_stat_force_next_flush()"))
    time.sleep(0.3)


def _plain(result: Any) -> Any:
    return len(result) if isinstance(result, list) else result


def run(admin_url: str, sizes: Sequence[int], say: Callable[[str], None]) -> dict[str, Any]:
    """Load a registry per size and measure every pass; the report."""
    runs = []
    for n in sizes:
        with scratch_database(admin_url, prefix="diredi_bench") as url:
            # One connection: every statement of a pass on one server process, whose statistics are
            # flushed after the pass; a pass that opened two sessions at once would fail here.
            engine = make_engine(url, pool_size=1, max_overflow=0, pool_timeout=10)
            stats = make_engine(url, pool_size=1, max_overflow=0)
            try:
                migrate.upgrade(engine)
                say(f"{n:,} devices: loading")
                fleet = load(engine, n, say)
                counter = Counter(engine)
                passes: list[Pass] = []
                with tempfile.TemporaryDirectory() as tmp, worker(engine, Path(tmp)):
                    passes += [one_pass(engine, stats, counter, t, "first") for t in TASKS]
                    # The first passes changed many rows (after an upgrade, the reports waiting are
                    # noticed): the statistics autovacuum keeps, before the passes of a running fleet.
                    _autocommit(engine, "VACUUM ANALYZE")
                    passes += [one_pass(engine, stats, counter, t, "idle") for t in TASKS]
                    change(engine, time.time())
                    passes += [one_pass(engine, stats, counter, t, "changed") for t in TASKS]
                    passes += [one_pass(engine, stats, counter, t, "idle again") for t in TASKS]
                for p in passes:
                    say(f"{n:,} devices: {p.task} {p.case}: {p.statements} statements, {p.ms:.1f} ms")
                runs.append({"fleet": asdict(fleet), "passes": [asdict(p) for p in passes]})
            finally:
                engine.dispose()
                stats.dispose()
    return {
        "benchmark": "beat_passes",
        "migration": migrate.head(),
        "changes": CHANGES,
        "postgres": _server_version(admin_url),
        **harness.machine_keys(),
        "runs": runs,
    }


def _scalar(engine: Engine, sql: str) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(sql)).scalar_one())


def _autocommit(engine: Engine, statement: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(statement))


def _server_version(admin_url: str) -> str:
    engine = make_engine(admin_url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar_one())
    finally:
        engine.dispose()


def print_table(report: dict[str, Any], console: Console) -> None:
    """One row per pass: its statements, rows and time."""
    table = harness.table(
        f"One beat pass, by what changed (migration {report['migration']}, PostgreSQL {report['postgres']}, "
        f"{report['cpus']} CPUs)",
        ("devices", "task", "pass", "statements", "rows returned", "rows read", "ms", "result"),
        left=3,
    )
    for one in report["runs"]:
        for p in one["passes"]:
            table.add_row(
                f"{one['fleet']['devices']:,}",
                p["task"],
                p["case"],
                f"{p['statements']:,}",
                f"{p['rows_returned']:,}",
                f"{p['rows_read']:,}",
                f"{p['ms']:.1f}",
                str(p["result"]),
            )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Run, print, write JSON."""
    parser = harness.parser(__doc__, "beat_passes")
    parser.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[10_000, 100_000],
        help=f"fleet sizes (each ≤ {MAX_DEVICES:,})",
    )
    args = parser.parse_args(argv)
    if not all(2 * HOME_SIZE * 100 <= n <= MAX_DEVICES for n in args.devices):
        parser.error(f"--devices must be {2 * HOME_SIZE * 100:,} to {MAX_DEVICES:,}")
    admin_url = harness.postgres_url()
    if make_url(admin_url).host not in LOOPBACK:
        raise SystemExit("the benchmark runs on a PostgreSQL on loopback only")
    console = Console(width=150)
    report = run(admin_url, args.devices, console.print)
    print_table(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
