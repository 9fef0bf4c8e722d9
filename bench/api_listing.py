"""Benchmark of the operator API against its database: listing devices (pages of 100) with 10,000
devices in PostgreSQL, measured against pgbench running the same SQL at the same concurrency.

Starts `diredi api` as a real server on loopback; wrk (C, from apt, so the load itself costs little
CPU) keeps 16 concurrent keep-alive clients paging through the device list at random offsets; then,
in the same run, pgbench runs the SQL the API issues for one such page (captured from the registry's
own code) with 16 clients on the same database: the database's own limit on this machine at that
moment. Reports the API's requests/s and p50/p99, pgbench's transactions/s and latency, and the ratio
API ÷ pgbench for each of `--runs` pairs and its median (target ≥ 0.5×, DESIGN §7). Writes
bench/results/api_listing.json. PostgreSQL comes from DIREDI_TEST_POSTGRES_URL (`scripts/services.sh
postgres`; pgbench comes with it); the benchmark uses a database of its own and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import glob
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import event, insert, make_url, text

from bench import harness
from cloud.registry import apikeys, migrate
from cloud.registry.common import OFFSET, hash_secret
from cloud.registry.db import async_reader_factory, make_engine, session_factory, transaction
from cloud.registry.devices import list_devices_async
from cloud.registry.tables import Cohort, Device, Presence, Role
from testsupport.postgres import scratch_database


def seed(url: str, devices: int) -> str:
    """Migrate, add one cohort and `devices` devices; return a viewer API key."""
    engine = make_engine(url)
    migrate.upgrade(engine)
    with transaction(session_factory(engine)) as session:
        session.add(Cohort(id="bench", description="benchmark fleet"))
        session.flush()
        presences = list(Presence)
        rows = [
            {
                "id": f"dev-{i:06d}",
                "cohort_id": "bench",
                "credential_hash": hash_secret(f"secret-{i}"),
                "labels": {"rack": str(i % 40)},
                "presence": presences[i % len(presences)],
            }
            for i in range(devices)
        ]
        session.execute(insert(Device), rows)
        _, key = apikeys.create_key(session, role=Role.viewer, name="bench")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))  # the steady state autovacuum keeps a live fleet in
    engine.dispose()
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_server(database_url: str, workers: int, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """`diredi api` in a subprocess on a free loopback port (with `extra_env`); yields its base URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "DIREDI_DATABASE_URL": database_url, "DIREDI_DATA_DIR": data_dir}
        env |= extra_env or {}
        diredi = str(Path(sys.executable).parent / "diredi")
        command = [diredi, "api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
        log = Path(data_dir) / "api.log"  # a file, not a pipe: a pipe nobody reads could stall it
        with log.open("wb") as sink:  # the server keeps its own copy of the descriptor
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink)  # noqa: S603
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the API did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.2)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


PAGE = 100  # devices per page, as the operator dashboards ask for them
TARGET_RATIO = 0.5  # the API's throughput against pgbench's on the same SQL (DESIGN §7)

WRK_SCRIPT = """
math.randomseed(os.time())
request = function()
  local offset = math.random(0, %(pages)d - 1) * %(page)d
  local path = "/api/v1/devices?limit=%(page)d&offset=" .. offset
  return wrk.format("GET", path, {["Authorization"] = "Bearer %(key)s"})
end
"""


def check_page(base: str, key: str) -> None:
    """One request by hand, so a wrong answer is not timed as a fast one."""
    response = httpx.get(
        f"{base}/api/v1/devices",
        params={"limit": PAGE, "offset": 0},
        headers={"Authorization": f"Bearer {key}"},
    )
    if response.status_code != 200 or len(response.json()["items"]) != PAGE:
        raise RuntimeError(f"bad response {response.status_code}: {response.text[:200]}")


def _timed(
    command: list[str], seconds: int, progress: Progress, label: str, env: dict[str, str] | None = None
) -> str:
    """Run `command` (which lasts `seconds`) with a progress bar; its standard output."""
    task = progress.add_task(f"{label}: {seconds} s", total=seconds)
    pipe = subprocess.PIPE
    process = subprocess.Popen(command, stdout=pipe, stderr=pipe, text=True, env=env)  # noqa: S603
    while process.poll() is None:
        time.sleep(0.5)
        progress.advance(task, 0.5)
    output, errors = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}):\n{output}\n{errors}")
    return output


def wrk(
    base: str, key: str, *, clients: int, seconds: int, devices: int, progress: Progress
) -> dict[str, float]:
    """`clients` concurrent keep-alive connections from wrk paging the listing at random offsets for
    `seconds`; its latency percentiles and request rate."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT % {"pages": max(1, devices // PAGE), "page": PAGE, "key": key})
        script.flush()
        command = [wrk_binary(), "-t2", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", script.name, base]
        output = _timed(command, seconds, progress, f"API (wrk, {clients} clients)")
    if "Non-2xx" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    return parse_wrk(output)


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(output: str) -> dict[str, float]:
    """p50/p99 (ms) and requests/s from wrk's --latency report."""
    figures: dict[str, float] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            value = re.fullmatch(r"([0-9.]+)(us|ms|s)", parts[1])
            if value:
                figures[f"p{parts[0][:-1]}_ms"] = float(value[1]) * UNITS[value[2]]
        elif line.startswith("Requests/sec:"):
            figures["requests_per_s"] = float(parts[1])
        elif "requests in" in line:
            figures["requests"] = float(parts[0])
    if len(figures) != 5:
        raise RuntimeError(f"cannot read wrk's report:\n{output}")
    return figures


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds these processes have used (Linux /proc; one that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def processes(*, port: int, database: str) -> dict[str, list[int]]:
    """This machine's processes of the API on `port` (uvicorn and its workers) and the PostgreSQL
    backends connected to `database` (its process title names it), from /proc."""
    found: dict[str, list[int]] = {"api": [], "postgres": []}
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f" api --host 127.0.0.1 --port {port} " in f"{command} ":
            found["api"].append(int(entry.name))
        elif command.startswith("postgres:") and f" {database} " in command:
            found["postgres"].append(int(entry.name))
    found["api"] += [pid for pid, parent in parents.items() if parent in found["api"]]
    return found


def listing_statements(url: str) -> list[tuple[str, dict[str, Any]]]:
    """The SQL and parameters the API sends for a page of the unfiltered listing (`list_devices_async`),
    captured at psycopg's cursor: what pgbench runs. (Each API process caches a checked key for seconds.)"""
    sent: list[tuple[str, dict[str, Any]]] = []

    class Recording(psycopg.AsyncCursor[Any]):
        async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            sent.append((str(query), dict(params or {})))
            return await super().execute(query, params, **kwargs)

    def record(_dbapi_connection: Any, entry: Any) -> None:
        entry.driver_connection.cursor_factory = Recording

    engine = async_reader_factory(url).kw["bind"]  # as the API makes its readers
    event.listen(engine.sync_engine, "connect", record)

    async def one_page() -> None:
        try:
            await list_devices_async(engine, limit=PAGE, offset=PAGE)
        finally:
            await engine.dispose()

    asyncio.run(one_page())
    return sent


def pgbench_script(statements: list[tuple[str, dict[str, Any]]], *, pages: int) -> str:
    """A pgbench script that sends `statements` as one transaction, at a random page offset like wrk's:
    psycopg's `%(name)s` parameters become pgbench variables, the page offset drawn for each page."""
    variables = {OFFSET: f"random(0, {pages - 1}) * {PAGE}"}
    commands = []
    for sql, parameters in statements:
        for name, value in parameters.items():
            if name != OFFSET:
                if not isinstance(value, int):  # only numbers can be \set; the listing has no others
                    raise RuntimeError(f"parameter {name}={value!r} cannot be a pgbench variable")
                variables[name] = str(value)
        text = re.sub(r"%\((\w+)\)s", r":\1", sql).replace("%%", "%")
        commands.append(" ".join(text.split()) + ";")
    return (
        "".join(f"\\set {name} {value}\n" for name, value in variables.items()) + "\n".join(commands) + "\n"
    )


def pgbench_binary() -> str:
    """pgbench from PATH, else from the newest PostgreSQL under /usr/lib/postgresql."""
    found = shutil.which("pgbench") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), key=_version, reverse=True)), None
    )
    if found is None:
        raise SystemExit("pgbench not found: it comes with PostgreSQL (scripts/services.sh postgres)")
    return found


def wrk_binary() -> str:
    """wrk from PATH."""
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk not found: scripts/services.sh wrk installs it (make bench does)")
    return found


def _version(path: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", path)]


def pgbench(url: str, script: str, *, clients: int, seconds: int, progress: Progress) -> dict[str, float]:
    """pgbench running `script` with `clients` connections (prepared statements, like psycopg's after
    five runs of a statement) for `seconds`; its transactions/s, latency average and percentiles."""
    parsed = make_url(url)
    env = {
        **os.environ,
        "PGHOST": parsed.host or "127.0.0.1",
        "PGPORT": str(parsed.port or 5432),
        "PGUSER": parsed.username or "",
        "PGPASSWORD": parsed.password or "",  # in the environment, not on a command line
        "PGDATABASE": parsed.database or "",
    }
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "listing.sql"
        path.write_text(script)
        command = [
            pgbench_binary(),
            "-n",
            "-M",
            "prepared",
            f"-c{clients}",
            "-j2",
            f"-T{seconds}",
            "-f",
            str(path),
        ]
        command += ["-l", "--log-prefix", str(Path(work) / "txn")]  # one line per transaction
        output = _timed(command, seconds, progress, f"pgbench ({clients} clients)", env=env)
        latencies = [
            float(line.split()[2]) / 1000
            for log in Path(work).glob("txn.*")
            for line in log.read_text().splitlines()
        ]
    figures = parse_pgbench(output)
    latencies.sort()
    return {**figures, "p50_ms": nearest_rank(latencies, 0.50), "p99_ms": nearest_rank(latencies, 0.99)}


def parse_pgbench(output: str) -> dict[str, float]:
    """Transactions/s (without connection time), latency average (ms), transactions and failures from
    pgbench's report; an error if any transaction failed."""
    patterns = {
        "tps": r"^tps = ([0-9.]+) \(without initial connection time\)",
        "latency_avg_ms": r"^latency average = ([0-9.]+) ms",
        "transactions": r"^number of transactions actually processed: (\d+)",
        "failed": r"^number of failed transactions: (\d+)",
    }
    figures = {}
    for name, pattern in patterns.items():
        found = re.search(pattern, output, re.MULTILINE)
        if found:
            figures[name] = float(found[1])
    if "failed" not in figures:  # pgbench before 15 has no such line: it aborts a failing client
        figures["failed"] = 0.0
    if len(figures) != len(patterns) or figures["transactions"] == 0:
        raise RuntimeError(f"cannot read pgbench's report:\n{output}")
    if figures["failed"]:
        raise RuntimeError(f"pgbench saw failed transactions:\n{output}")
    return figures


def nearest_rank(ordered: list[float], fraction: float) -> float:
    """The `fraction` percentile of ascending `ordered` by the nearest-rank method."""
    if not ordered:
        raise ValueError("no values")
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def run(
    admin_url: str, *, devices: int, clients: int, seconds: int, workers: int, runs: int
) -> dict[str, Any]:
    """Seed once, start the API, then measure it and pgbench in turn `runs` times."""
    rows: list[dict[str, Any]] = []
    with scratch_database(admin_url, prefix="diredi_bench") as url:
        key = seed(url, devices)
        script = pgbench_script(listing_statements(url), pages=max(1, devices // PAGE))
        with api_server(url, workers) as base, Progress(transient=True) as progress:
            check_page(base, key)
            wrk(base, key, clients=clients, seconds=2, devices=devices, progress=progress)  # warm-up
            port, database_name = int(base.rsplit(":", 1)[1]), make_url(url).database or ""
            for number in range(1, runs + 1):
                watched = processes(port=port, database=database_name)
                before = {name: cpu_seconds(pids) for name, pids in watched.items()}
                api = wrk(base, key, clients=clients, seconds=seconds, devices=devices, progress=progress)
                for name, pids in watched.items():  # CPU per page: what each side costs, whatever else runs
                    if pids:
                        used = cpu_seconds(pids) - before[name]
                        api[f"{name}_cpu_ms_per_request"] = 1000 * used / api["requests"]
                database = pgbench(url, script, clients=clients, seconds=seconds, progress=progress)
                ratio = api["requests_per_s"] / database["tps"]
                rows.append({"run": number, "api": api, "pgbench": database, "ratio": ratio})
    median = statistics.median(r["ratio"] for r in rows)
    return {
        "benchmark": "api_listing",
        "devices": devices,
        "clients": clients,
        "page_size": PAGE,
        "server_workers": workers,
        "seconds": seconds,
        "target_ratio": TARGET_RATIO,
        "median_ratio": median,
        "target_met": median >= TARGET_RATIO,
        "pgbench_script": script,
        **harness.machine_keys(),
        "runs": rows,
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    """Each run's API and pgbench figures and their ratio, then the median ratio against the target."""
    target = report["target_ratio"]
    columns = ("run", "API req/s", "API p50 ms", "API p99 ms", "CPU ms/page API", "… PostgreSQL")
    table = harness.table(
        f"Device listing: {report['devices']:,} devices in PostgreSQL, {report['clients']} concurrent "
        f"clients, pages of {report['page_size']}, {report['server_workers']} API workers "
        f"({report['cpus']} CPUs)",
        (*columns, "pgbench tps", "pgbench avg ms", "pgbench p99 ms", "API ÷ pgbench", f"≥ {target}×"),
    )
    for r in report["runs"]:
        api, database = r["api"], r["pgbench"]
        table.add_row(
            str(r["run"]),
            f"{api['requests_per_s']:.0f}",
            f"{api['p50_ms']:.1f}",
            f"{api['p99_ms']:.1f}",
            *(_ms(api.get(f"{name}_cpu_ms_per_request")) for name in ("api", "postgres")),
            f"{database['tps']:.0f}",
            f"{database['latency_avg_ms']:.1f}",
            f"{database['p99_ms']:.1f}",
            f"{r['ratio']:.2f}×",
            "yes" if r["ratio"] >= target else "NO",
        )
    median = report["median_ratio"]
    table.add_row(
        "median", *[""] * 8, f"{median:.2f}×", "yes" if report["target_met"] else "NO", style="bold"
    )
    console.print(table)
    console.print("pgbench ran, per transaction:", style="dim")
    console.print(report["pgbench_script"], style="dim", markup=False, highlight=False)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    """Run, print, write JSON."""
    parser = harness.parser(__doc__, "api_listing")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16, help="for wrk and for pgbench")
    parser.add_argument("--seconds", type=int, default=15, help="duration of each measurement")
    parser.add_argument("--workers", type=int, default=2, help="API server worker processes")
    parser.add_argument("--runs", type=int, default=3, help="API and pgbench pairs; the median ratio counts")
    args = parser.parse_args(argv)
    wrk_binary(), pgbench_binary()  # both before anything starts
    report = run(
        harness.postgres_url(),
        devices=args.devices,
        clients=args.clients,
        seconds=args.seconds,
        workers=args.workers,
        runs=args.runs,
    )
    console = Console(width=170)
    print_table(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
