"""Benchmark of the operator API: listing devices (pages of 100) with 10,000 devices in PostgreSQL.

Starts `diredi api` as a real server on loopback, 16 concurrent keep-alive clients each page through
the device list, and reports p50/p99 latency and requests/s (target p99 ≤ 50 ms, DESIGN §7).
Writes bench/results/api_listing.json. PostgreSQL comes from DIREDI_TEST_POSTGRES_URL
(`scripts/services.sh postgres`); the benchmark uses a database of its own and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
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
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import create_engine, insert, make_url, text

from cloud.registry import apikeys, migrate
from cloud.registry.common import hash_secret
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.tables import Cohort, Device, Presence, Role

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database for the run, dropped afterwards."""
    admin = make_url(admin_url).set(drivername="postgresql+psycopg")
    name = f"diredi_bench_{secrets.token_hex(4)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


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
    with engine.connect() as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_server(database_url: str, workers: int) -> Iterator[str]:
    """`diredi api` in a subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "DIREDI_DATABASE_URL": database_url, "DIREDI_DATA_DIR": data_dir}
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
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
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
                    raise RuntimeError(f"the API did not start: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
                time.sleep(0.2)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


async def load(
    base: str, key: str, *, clients: int, requests: int, devices: int, progress: Progress
) -> list[float]:
    """`clients` concurrent keep-alive clients make `requests` page requests in all; the latencies in s."""
    latencies: list[float] = []
    pages = max(1, devices // 100)
    task = progress.add_task("GET /api/v1/devices?limit=100", total=requests)
    remaining = requests

    async def client(seed: int) -> None:
        nonlocal remaining
        rng = random.Random(seed)  # noqa: S311 - page choice, not a secret
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
            while remaining > 0:
                remaining -= 1
                offset = rng.randrange(pages) * 100
                started = time.perf_counter()
                response = await http.get("/api/v1/devices", params={"limit": 100, "offset": offset})
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200 or len(response.json()["items"]) != 100:
                    raise RuntimeError(f"bad response {response.status_code}: {response.text[:200]}")
                progress.advance(task)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if q < 100 else max(values)
    )


def run(admin_url: str, *, devices: int, clients: int, requests: int, workers: list[int]) -> dict[str, Any]:
    """Seed once, then measure each server configuration."""
    rows = []
    with scratch_database(admin_url) as url:
        key = seed(url, devices)
        for count in workers:
            with api_server(url, count) as base, Progress(transient=True) as progress:
                asyncio.run(
                    load(
                        base,
                        key,
                        clients=clients,
                        requests=min(200, requests),
                        devices=devices,
                        progress=progress,
                    )
                )  # warm-up: connections, caches, JIT-free but lazy imports
                started = time.perf_counter()
                latencies = asyncio.run(
                    load(base, key, clients=clients, requests=requests, devices=devices, progress=progress)
                )
                wall = time.perf_counter() - started
            rows.append(
                {
                    "server_workers": count,
                    "requests": len(latencies),
                    "requests_per_s": len(latencies) / wall,
                    "p50_ms": 1000 * statistics.median(latencies),
                    "p99_ms": 1000 * percentile(latencies, 99),
                    "max_ms": 1000 * max(latencies),
                }
            )
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
    for column in ("server workers", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "p99 ≤ 50 ms"):
        table.add_column(column, justify="right")
    for r in report["runs"]:
        table.add_row(
            str(r["server_workers"]),
            str(r["requests"]),
            f"{r['requests_per_s']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['max_ms']:.1f}",
            "yes" if r["p99_ms"] <= report["target_p99_ms"] else "NO",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Run, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="server worker processes to try"
    )
    args = parser.parse_args(argv)
    admin_url = os.environ.get("DIREDI_TEST_POSTGRES_URL")
    if not admin_url:
        raise SystemExit("set DIREDI_TEST_POSTGRES_URL (scripts/services.sh postgres prints it)")
    report = run(
        admin_url, devices=args.devices, clients=args.clients, requests=args.requests, workers=args.workers
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "api_listing.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    console = Console(width=140)
    print_table(report, console)
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
