"""Benchmark of the ingest (DESIGN §7): status messages per second committed into PostgreSQL from a
real mosquitto, against the broker's own pass-through measured in the same run.

One publisher (`mosquitto_pub -l`, the cloud's account, one process per device topic of 10 provisioned
devices) sends N QoS 1 messages of ~512 B, as fast as the broker takes them. Pass-through:
`mosquitto_sub` (C) as a subscriber that only counts, until it has all N. Ingest: 1, then 2
`diredi ingest` processes on one shared subscription; the rate is distinct msg_ids committed per
second, from the first publish to the commit of the last, and every message must be stored exactly
once (zero loss at QoS 1). Targets: ≥ 5,000 msg/s and ≥ 0.5× the pass-through.

A second table splits each path's CPU per message by part (broker, receiver, PostgreSQL, the rest).
Publishers, broker and receiver share the machine's cores: where the machine is saturated, the ratio
of two paths is the inverse ratio of their totals, which says what a cheaper part could win.
Writes bench/results/ingest_throughput.json.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import psutil
from rich.console import Console
from rich.progress import Progress

from bench import harness
from bench.mqtt_lab import (
    CpuSplit,
    Lab,
    UsageMeter,
    database_backends,
    ingests,
    lab,
    last_telemetry_id,
    provision,
    stored_telemetry,
)
from broker.mosquitto import find_binary
from wire.messages import Status, encode
from wire.topics import MessageKind, device_filter, device_topic

DEVICES = [f"bench-{n:04d}" for n in range(100)]
TARGET_RATE = 5000
TARGET_RATIO = 0.5
WARM_UP = 2000  # messages through the broker, and through each set of ingests, before measuring


def status_messages(count: int) -> list[tuple[str, bytes]]:
    """`count` status messages of ~512 B, each with its own msg_id, round-robin over `PUBLISHERS` devices."""
    messages = []
    for n in range(count):
        device_id = DEVICES[n % PUBLISHERS]
        status = Status(
            device_id=device_id,
            model_id="digits-home-cameras.v12",
            uptime_s=float(n),
            inference_count=n * 20,
            latency_p50_ms=4.1,
            latency_p95_ms=7.9,
            mean_confidence=0.93,
            class_histogram={str(c): n % 997 + 100 * c for c in range(16)},
            labelled_count=n % 50,
            accuracy=0.96,
            cpu_percent=23.5,
            mem_bytes=61_234_567,
            temp_c=48.5,
        )
        messages.append((device_topic(device_id, MessageKind.STATUS), encode(status)))
    return messages


PUBLISHERS = 10  # mosquitto_pub processes, one device topic each


def publish(lab: Lab, messages: list[tuple[str, bytes]]) -> float:
    """Publish every message at QoS 1 with `mosquitto_pub -l` (C: a Python publisher tops out near
    6,000 msg/s here, below what is measured), one process per topic; returns the monotonic time the
    publishing started, after all of them are done."""
    by_topic: dict[str, list[bytes]] = {}
    for topic, payload in messages:
        by_topic.setdefault(topic, []).append(payload)
    inputs = []
    for n, (topic, payloads) in enumerate(by_topic.items()):
        path = lab.workdir / f"publish-{n}.jsonl"
        path.write_bytes(b"\n".join(payloads) + b"\n")
        inputs.append((topic, path))
    binary = str(find_binary("mosquitto_pub"))
    started = time.monotonic()
    publishers = []
    for n, (topic, path) in enumerate(inputs):
        command = [
            binary, "-h", lab.target.host, "-p", str(lab.target.port), "-V", "5",
            "-u", str(lab.cloud.username), "-P", str(lab.cloud.password), "-i", f"bench-publisher-{n}",
            "-q", "1", "-t", topic, "-l",
        ]  # fmt: skip
        with path.open("rb") as lines:
            publishers.append(subprocess.Popen(command, stdin=lines, stderr=subprocess.PIPE))  # noqa: S603
    for publisher in publishers:
        if publisher.wait(300) != 0:
            raise RuntimeError(
                f"mosquitto_pub failed: {publisher.stderr.read() if publisher.stderr else b''!r}"
            )
    return started


def passthrough(lab: Lab, messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    """mosquitto_sub counting N messages at QoS 1: the broker's own rate."""
    password = str(lab.cloud.password)
    command = [
        str(find_binary("mosquitto_sub")),
        "-h", lab.target.host, "-p", str(lab.target.port), "-V", "5",
        "-u", str(lab.cloud.username), "-P", password, "-i", "bench-counter",
        "-q", "1", "-t", device_filter(MessageKind.STATUS), "-C", str(len(messages)),
    ]  # fmt: skip
    counter = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    time.sleep(1.0)  # subscribed
    broker = psutil.Process(lab.broker.pid or 0)
    meter, split = UsageMeter([broker]), CpuSplit({"broker": [broker]})
    started = publish(lab, messages)
    status, counter_cpu = reap(counter.pid, time.monotonic() + 300)
    elapsed = time.monotonic() - started
    usage = meter.done()
    cpu = split.done(len(messages), receiver=counter_cpu)
    if status is None:
        counter.kill()
        raise RuntimeError("mosquitto_sub did not receive every message")
    counter.returncode = status
    if status != 0:
        raise RuntimeError(f"mosquitto_sub failed: {counter.stderr.read() if counter.stderr else b''!r}")
    return {
        "msg_per_s": len(messages) / elapsed,
        "seconds": elapsed,
        "broker_cpu_percent": usage.cpu_percent,
        "cpu_us_per_message": cpu,
    }


def reap(pid: int, deadline: float) -> tuple[int | None, float]:
    """Wait for child `pid` to exit (until the deadline): its exit code (None if it has not) and the
    CPU seconds it used, which only its exit status still holds."""
    while time.monotonic() < deadline:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
        time.sleep(0.005)
    return None, 0.0


def ingest_run(
    lab: Lab, messages: list[tuple[str, bytes]], processes: int, *, batch_size: int
) -> dict[str, Any]:
    """N messages through `processes` ingests into PostgreSQL; every one stored exactly once. The
    ingests are warmed first, as the broker is for the pass-through: their first batch pays for
    connecting to the database and preparing statements (near a second here), which a running
    ingest paid once at start."""
    with ingests(lab, processes, batch_size=batch_size) as workers:
        warm, mark = status_messages(WARM_UP), telemetry_mark(lab)
        publish(lab, warm)
        until_stored(lab, mark, len(warm), time.monotonic() + 120)
        broker = psutil.Process(lab.broker.pid or 0)
        meter, mark = UsageMeter([broker, *workers]), telemetry_mark(lab)
        split = CpuSplit({"broker": [broker], "receiver": workers, "PostgreSQL": database_backends(lab)})
        started = publish(lab, messages)
        stored = until_stored(lab, mark, len(messages), started + 600, meter)
        elapsed = time.monotonic() - started
        usage = meter.done()
        cpu = split.done(len(messages))
    if stored != len(messages):
        raise RuntimeError(f"{processes} ingest(s) stored {stored} of {len(messages)} messages")
    return {
        "msg_per_s": len(messages) / elapsed,
        "seconds": elapsed,
        "stored": stored,
        "cpu_percent_broker_and_ingests": usage.cpu_percent,
        "rss_mb_broker_and_ingests": usage.rss_mb,
        "cpu_us_per_message": cpu,
    }


def telemetry_mark(lab: Lab) -> tuple[int, int]:
    """How many status rows are stored, and the highest id, before messages are published."""
    return stored_telemetry(lab), last_telemetry_id(lab)


def until_stored(
    lab: Lab, mark: tuple[int, int], count: int, deadline: float, meter: UsageMeter | None = None
) -> int:
    """Wait until `count` status rows more than at `mark` are committed (or the deadline); return how
    many were."""
    before, base_id = mark
    stored = 0
    while stored < count and time.monotonic() < deadline:
        time.sleep(0.02)
        if meter is not None:
            meter.sample()
        if last_telemetry_id(lab) - base_id >= count:  # cheap; then count exactly
            stored = stored_telemetry(lab) - before
    return stored


def run(admin_url: str, *, count: int, processes: list[int], batch_size: int) -> dict[str, Any]:
    with lab(admin_url) as bench_lab, Progress(transient=True) as progress:
        task = progress.add_task("ingest benchmark", total=2 + len(processes))
        provision(bench_lab, DEVICES)
        progress.advance(task)
        passthrough(bench_lab, status_messages(WARM_UP))
        reference = passthrough(bench_lab, status_messages(count))
        progress.advance(task)
        runs = []
        for n in processes:
            figures = ingest_run(bench_lab, status_messages(count), n, batch_size=batch_size)
            runs.append(
                {
                    "ingest_processes": n,
                    **figures,
                    "ratio_to_passthrough": figures["msg_per_s"] / reference["msg_per_s"],
                }
            )
            progress.advance(task)
    return {
        "benchmark": "ingest_throughput",
        "messages": count,
        "batch_size": batch_size,
        "payload_bytes": len(status_messages(1)[0][1]),
        "passthrough": reference,
        "runs": runs,
        "targets": {"msg_per_s": TARGET_RATE, "ratio_to_passthrough": TARGET_RATIO},
        **harness.machine_keys(),
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    table = harness.table(
        f"Ingest: {report['messages']:,} QoS 1 status messages of {report['payload_bytes']} B into "
        f"PostgreSQL ({report['cpus']} CPUs)",
        ("path", "msg/s", "seconds", "× pass-through", "≥ 5,000/s and ≥ 0.5×", "CPU % (broker+ingest)"),
    )
    p = report["passthrough"]
    table.add_row(
        "broker pass-through (mosquitto_sub)",
        f"{p['msg_per_s']:,.0f}",
        f"{p['seconds']:.1f}",
        "1.00",
        "",
        f"{p['broker_cpu_percent']:.0f}",
    )
    for r in report["runs"]:
        ok = r["msg_per_s"] >= TARGET_RATE and r["ratio_to_passthrough"] >= TARGET_RATIO
        table.add_row(
            f"{r['ingest_processes']} ingest process(es)",
            f"{r['msg_per_s']:,.0f}",
            f"{r['seconds']:.1f}",
            f"{r['ratio_to_passthrough']:.2f}",
            "yes" if ok else "NO",
            f"{r['cpu_percent_broker_and_ingests']:.0f}",
        )
    console.print(table)
    split = harness.table(
        "CPU per message, µs of one core (rest: the publishers, this benchmark, the kernel)",
        ("path", "broker", "receiver", "PostgreSQL", "rest", "total", "machine busy %"),
    )
    paths = [("pass-through (receiver: mosquitto_sub)", p)] + [
        (f"{r['ingest_processes']} ingest process(es)", r) for r in report["runs"]
    ]
    for label, figures in paths:
        cpu = figures["cpu_us_per_message"]
        split.add_row(
            label,
            *(f"{cpu[part]:.1f}" if part in cpu else "" for part in ("broker", "receiver", "PostgreSQL")),
            f"{cpu['rest']:.1f}",
            f"{cpu['total']:.1f}",
            f"{cpu['busy_percent']:.0f}",
        )
    console.print(split)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "ingest_throughput")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="DIREDI_INGEST_BATCH_SIZE of the ingests"
    )
    args = parser.parse_args(argv)
    admin_url = harness.postgres_url()
    console = Console()
    report = run(admin_url, count=args.messages, processes=args.processes, batch_size=args.batch_size)
    print_table(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
