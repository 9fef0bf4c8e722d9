"""Benchmark: a valid operator's latency while another address floods the API with wrong API keys.

Starts `diredi api` (one worker, a PostgreSQL registry of its own with 1,000 devices, from
DIREDI_TEST_POSTGRES_URL) on loopback. The clients speak as
the nginx front does: from 127.0.0.1, which uvicorn trusts, with the client's address in
X-Forwarded-For, so two source addresses can be told apart on one machine. A valid client pages the
device list sequentially (`--requests` calls) alone, then while `--flooders` threads send wrong keys
from another address as fast as they can (bounded: `--flood` requests in all); once with the failed-
authentication limit as configured (default: 20 failures a minute per address) and once with it off
(a burst no flood reaches). Prints p50/p99 of the valid client in each phase, the flood's answers and
rate, and writes bench/results/auth_flood.json.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np
from rich.console import Console

from bench import harness
from bench.api_listing import api_server, seed
from testsupport.postgres import scratch_database

VALID_SOURCE = "198.51.100.10"
FLOOD_SOURCE = "203.0.113.66"


def latencies(base: str, key: str, count: int) -> list[float]:
    """`count` sequential device-list pages as the valid client, each one's latency in ms."""
    headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": VALID_SOURCE}
    out = []
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for i in range(count):
            started = time.perf_counter()
            response = client.get("/api/v1/devices", params={"limit": 50, "offset": (i * 50) % 1000})
            out.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"the valid client got {response.status_code}: {response.text[:200]}")
    return out


def flood(base: str, total: int, threads: int, stop: threading.Event) -> dict[str, Any]:
    """Wrong keys from FLOOD_SOURCE, `total` requests over `threads` threads, until done or `stop`."""
    answers: Counter[int] = Counter()
    lock = threading.Lock()
    remaining = [total]

    def run(index: int) -> None:
        headers = {"X-Forwarded-For": FLOOD_SOURCE}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            n = 0
            while not stop.is_set():
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                n += 1
                guess = f"Bearer wrong-{index}-{n}-" + "x" * 32
                status = client.get("/api/v1/devices", headers={"Authorization": guess}).status_code
                with lock:
                    answers[status] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    return {"answers": answers, "workers": workers, "started": started}


def phase(base: str, key: str, args: argparse.Namespace, *, flooding: bool) -> dict[str, Any]:
    stop = threading.Event()
    state = flood(base, args.flood, args.flooders, stop) if flooding else None
    if state is not None:
        time.sleep(0.5)  # the flood is under way (and, with the limit, past its burst)
    measured = latencies(base, key, args.requests)
    result: dict[str, Any] = {
        "p50_ms": float(np.percentile(measured, 50)),
        "p99_ms": float(np.percentile(measured, 99)),
    }
    if state is not None:
        stop.set()
        for worker in state["workers"]:
            worker.join(timeout=60)
        seconds = time.perf_counter() - state["started"]
        answers = dict(sorted(state["answers"].items()))
        result |= {"flood_answers": answers, "flood_rate": sum(answers.values()) / seconds}
    return result


def run(admin_url: str, args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": harness.machine(), "config": vars(args), "phases": {}}
    with scratch_database(admin_url, prefix="diredi_bench") as database:
        key = seed(database, 1000)
        for label, burst in (("limit on", None), ("limit off", "10000")):
            extra = {"DIREDI_API_AUTH_FAILURE_BURST": burst} if burst else {}
            with api_server(database, 1, extra) as base:
                latencies(base, key, 20)  # warm up
                report["phases"][f"alone ({label})"] = phase(base, key, args, flooding=False)
                report["phases"][f"under a wrong-key flood ({label})"] = phase(base, key, args, flooding=True)
    return report


def print_table(report: dict[str, Any], console: Console) -> None:
    table = harness.table(
        "A valid client's latency (device list, 50 a page) while another address floods wrong keys",
        ("phase", "p50 ms", "p99 ms", "flood answers", "flood req/s"),
        left=1,
    )
    for name, row in report["phases"].items():
        answers = ", ".join(f"{k}: {v}" for k, v in row.get("flood_answers", {}).items()) or "-"
        rate = f"{row['flood_rate']:.0f}" if "flood_rate" in row else "-"
        table.add_row(name, f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}", answers, rate)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "auth_flood")
    parser.add_argument("--requests", type=int, default=300, help="the valid client's requests per phase")
    parser.add_argument("--flood", type=int, default=5000, help="wrong-key requests per flood, at most")
    parser.add_argument("--flooders", type=int, default=4, help="flooding threads")
    args = parser.parse_args(argv)
    report = run(harness.postgres_url(), args)
    console = Console(width=150)
    print_table(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
