"""Benchmark of what the ingest holds when it comes back to a backlog of large messages.

A device publishes `--messages` knowledge-topic messages of `--size` bytes (the contract's largest is
256 KiB) while `diredi ingest` is stopped; mosquitto (production configuration) queues them for the
ingest's persistent session. The ingest then starts again and takes the backlog; its RSS is sampled
every 10 ms from when it has connected until it has handled every message, and compared with the same
ingest's RSS when it had nothing to take: once with the byte budget per batch
(`DIREDI_INGEST_BATCH_BYTES`, default 8 MiB) and once with the budget out of the way (1 GiB: batches
bounded only by count, 1,000, and time, 50 ms). The payloads are refused as invalid (they are
padding): the memory is in taking them, and a refusal is handled like a stored message (acknowledged
after its batch).
Writes bench/results/ingest_memory.json. PostgreSQL comes from DIREDI_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import Progress

from bench import harness
from bench.mqtt_lab import Lab, lab, provision
from cloud.children import free_ports
from wire.topics import MessageKind, device_topic

UNBOUNDED = 1 << 30


@contextmanager
def ingest(lab_: Lab, name: str, group: str, batch_bytes: int) -> Iterator[tuple[psutil.Process, int]]:
    """`diredi ingest --name NAME` with this budget; yields the process and its metrics port once it
    is subscribed, and stops it (SIGTERM) on the way out."""
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "DIREDI_MQTT_URL": lab_.cloud.url(),
        "DIREDI_DATABASE_URL": lab_.database_url,
        "DIREDI_DATA_DIR": str(lab_.workdir / "data"),
        "DIREDI_INGEST_GROUP": group,
        "DIREDI_INGEST_BATCH_BYTES": str(batch_bytes),
    }
    log = lab_.workdir / f"ingest-{name}-{batch_bytes}.log"
    command = [
        str(Path(sys.executable).parent / "diredi"),
        "ingest",
        "--name",
        name,
        "--metrics-port",
        str(port),
    ]
    with log.open("ab") as sink:
        offset = sink.tell()  # the same ingest's earlier run wrote before
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=sink)  # noqa: S603
    try:
        deadline = time.monotonic() + 60
        while b"subscribed" not in log.read_bytes()[offset:]:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(
                    f"the ingest did not subscribe:\n{log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)
        yield psutil.Process(process.pid), port
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def handled(port: int) -> int:
    """Messages the ingest has handled: stored, duplicates and refused, from its metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:  # noqa: S310
        text = answer.read().decode()
    names = {"diredi_ingest_stored_total", "diredi_ingest_duplicates_total", "diredi_ingest_rejected_total"}
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in names
        )
    )


def backlog(lab_: Lab, device_id: str, secret: str, messages: int, size: int) -> None:
    """Publish `messages` padding payloads of `size` bytes on the device's knowledge topic (QoS 1)."""
    target = lab_.target.with_credentials(device_id, secret)
    client = target.client(device_id)
    client.max_inflight_messages_set(100)
    target.connect(client)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{device_id} could not connect to the broker")
        time.sleep(0.01)
    try:
        topic = device_topic(device_id, MessageKind.KNOWLEDGE)
        padding = b'{"schema": "diredi.knowledge/1", "pad": "' + b"x" * (size - 48) + b'"}'
        sent = [client.publish(topic, padding, qos=1) for _ in range(messages)]
        for info in sent:
            info.wait_for_publish(60)
            if not info.is_published():
                raise RuntimeError("the broker did not take the backlog")
    finally:
        client.disconnect()
        client.loop_stop()


def measure(lab_: Lab, device_id: str, secret: str, messages: int, size: int, budget: int) -> dict[str, Any]:
    name, group = f"mem-{secrets.token_hex(3)}", f"mem-{secrets.token_hex(3)}"
    with ingest(lab_, name, group, budget) as (process, port):  # its session exists from now on
        time.sleep(1.0)  # whatever was retained comes in
        idle, base = handled(port), process.memory_info().rss  # an ingest with nothing to take
    backlog(lab_, device_id, secret, messages, size)
    started = time.monotonic()
    with ingest(lab_, name, group, budget) as (process, port):
        peak = process.memory_info().rss
        deadline = time.monotonic() + 300
        while handled(port) < messages + idle and time.monotonic() < deadline:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)
        done = handled(port) - idle
        seconds = time.monotonic() - started
    return {
        "batch_bytes": budget,
        "handled": done,
        "rss_idle_mb": base / 2**20,
        "rss_peak_mb": peak / 2**20,
        "rss_growth_mb": (peak - base) / 2**20,
        "seconds": seconds,
    }


def run(admin_url: str, messages: int, size: int) -> dict[str, Any]:
    rows = []
    with lab(admin_url) as running, Progress() as progress:
        device_id = "mem-cam-1"
        secret = provision(running, [device_id])[device_id]
        task = progress.add_task("backlogs", total=2)
        for budget in (8 << 20, UNBOUNDED):
            rows.append(measure(running, device_id, secret, messages, size, budget))
            progress.advance(task)
    return {
        "benchmark": "ingest_memory",
        "machine": harness.machine(),
        "messages": messages,
        "message_bytes": size,
        "backlog_mb": messages * size / 2**20,
        "rows": rows,
    }


def show(report: dict[str, Any], console: Console) -> None:
    table = harness.table(
        f"diredi ingest taking a backlog of {report['messages']:,} messages of "
        f"{report['message_bytes']:,} B ({report['backlog_mb']:.0f} MiB) from mosquitto",
        ("budget per batch", "handled", "RSS idle", "peak RSS", "growth", "seconds"),
    )
    for row in report["rows"]:
        budget = "none (1 GiB)" if row["batch_bytes"] == UNBOUNDED else f"{row['batch_bytes'] >> 20} MiB"
        table.add_row(
            budget,
            f"{row['handled']:,}",
            f"{row['rss_idle_mb']:.0f} MiB",
            f"{row['rss_peak_mb']:.0f} MiB",
            f"{row['rss_growth_mb']:.0f} MiB",
            f"{row['seconds']:.1f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "ingest_memory")
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--size", type=int, default=250_000, help="bytes per message (at most 262,144)")
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= 1000:
        parser.error("--messages: between 1 and 1,000 (mosquitto queues 256 MiB for a session)")
    if not 1024 <= args.size <= 262_144:
        parser.error("--size: between 1,024 and 262,144 bytes")
    report = run(harness.postgres_url(), args.messages, args.size)
    console = Console()
    show(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
