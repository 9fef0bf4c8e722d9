"""Benchmark of the operator API: listing devices (pages of 100) with 10,000 devices in PostgreSQL.

Starts `diredi api` as a real server on loopback; wrk (C, from apt, so the load itself costs little
CPU) keeps 16 concurrent keep-alive clients paging through the device list at random offsets; reports
p50/p99 latency and requests/s (target p99 ≤ 50 ms, DESIGN §7), and beside them the same clients on
/healthz: the machine's speed at that moment, which varies by half on a shared VM within minutes.
Writes bench/results/api_listing.json. PostgreSQL comes from DIREDI_TEST_POSTGRES_URL
(`scripts/services.sh postgres`); the benchmark uses a database of its own and drops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import insert, text

from cloud.registry import apikeys, migrate
from cloud.registry.common import hash_secret
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.tables import Cohort, Device, Presence, Role
from testsupport.postgres import scratch_database

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


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
        command = [
            str(Path(sys.executable).parent / "diredi"),
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        log = (
            Path(data_dir) / "api.log"
        )  # a file, not a pipe: a pipe nobody reads could fill and stall the server
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


WRK_SCRIPT = """
math.randomseed(os.time())
request = function()
  local offset = math.random(0, %(pages)d - 1) * 100
  local path = "/api/v1/devices?limit=100&offset=" .. offset
  return wrk.format("GET", path, {["Authorization"] = "Bearer %(key)s"})
end
"""


def check_page(base: str, key: str) -> None:
    """One request by hand, so a wrong answer is not timed as a fast one."""
    response = httpx.get(
        f"{base}/api/v1/devices",
        params={"limit": 100, "offset": 0},
        headers={"Authorization": f"Bearer {key}"},
    )
    if response.status_code != 200 or len(response.json()["items"]) != 100:
        raise RuntimeError(f"bad response {response.status_code}: {response.text[:200]}")


def wrk(
    base: str, key: str, *, clients: int, seconds: int, devices: int, progress: Progress, floor: bool = False
) -> dict[str, float]:
    """`clients` concurrent keep-alive connections from wrk (C, so the load costs little CPU) for
    `seconds`; its latency percentiles and request rate. With `floor`, they all ask for /healthz (no
    credentials, no database): what this machine can serve at the moment, to read the listing against."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT % {"pages": max(1, devices // 100), "key": key})
        script.flush()
        target = ["--latency", f"{base}/healthz"] if floor else ["--latency", "-s", script.name, base]
        command = ["wrk", "-t2", f"-c{clients}", f"-d{seconds}s", *target]
        task = progress.add_task(f"wrk: {clients} clients, {seconds} s", total=seconds)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # noqa: S603
        while process.poll() is None:
            time.sleep(0.5)
            progress.advance(task, 0.5)
        output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0 or "Non-2xx" in output:
        raise RuntimeError(f"wrk failed or saw errors:\n{output}")
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


def run(admin_url: str, *, devices: int, clients: int, seconds: int, workers: list[int]) -> dict[str, Any]:
    """Seed once, then measure each server configuration."""
    rows = []
    with scratch_database(admin_url, prefix="diredi_bench") as url:
        key = seed(url, devices)
        for count in workers:
            with api_server(url, count) as base, Progress(transient=True) as progress:
                check_page(base, key)
                wrk(base, key, clients=clients, seconds=2, devices=devices, progress=progress)  # warm-up
                figures = wrk(base, key, clients=clients, seconds=seconds, devices=devices, progress=progress)
                floor = wrk(
                    base,
                    key,
                    clients=clients,
                    seconds=seconds,
                    devices=devices,
                    progress=progress,
                    floor=True,
                )
            rows.append({"server_workers": count, **figures, "floor": floor})
    return {
        "benchmark": "api_listing",
        "devices": devices,
        "clients": clients,
        "page_size": 100,
        "target_p99_ms": 50,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "runs": rows,
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"Device listing: {report['devices']:,} devices in PostgreSQL, "
        f"{report['clients']} concurrent clients, pages of 100 ({report['cpus']} CPUs)"
    )
    columns = ("server workers", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99 ≤ 50 ms")
    for column in (*columns, "/healthz req/s", "/healthz p99 ms"):
        table.add_column(column, justify="right")
    for r in report["runs"]:
        table.add_row(
            str(r["server_workers"]),
            f"{r['requests']:.0f}",
            f"{r['requests_per_s']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p90_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            "yes" if r["p99_ms"] <= report["target_p99_ms"] else "NO",
            f"{r['floor']['requests_per_s']:.0f}",
            f"{r['floor']['p99_ms']:.1f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Run, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=15, help="duration of each measured run")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="server worker processes to try"
    )
    args = parser.parse_args(argv)
    admin_url = os.environ.get("DIREDI_TEST_POSTGRES_URL")
    if not admin_url:
        raise SystemExit("set DIREDI_TEST_POSTGRES_URL (scripts/services.sh postgres prints it)")
    report = run(
        admin_url, devices=args.devices, clients=args.clients, seconds=args.seconds, workers=args.workers
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "api_listing.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    console = Console(width=140)
    print_table(report, console)
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
