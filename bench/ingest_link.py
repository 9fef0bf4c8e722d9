"""Benchmark of the ingest's MQTT receive path alone (no database): the ingest's own link
(cloud/ingest/link.py) against paho driven by its external-loop API (`loop_read`/`loop_write` on the
caller's thread, manual acknowledgement), on the same mosquitto, the same N QoS 1 status messages of
~512 B from `mosquitto_pub`, in the same run. Each client subscribes, receives every message and
acknowledges in batches of 1,000, as the ingest does; the rate is messages per second from the first
publish to the last acknowledgement sent. Writes bench/results/ingest_link.json.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from rich.console import Console

from bench import harness
from bench.ingest_throughput import DEVICES, publish, status_messages
from bench.mqtt_lab import Lab, lab, provision
from cloud.ingest.link import IngestLink
from wire.topics import MessageKind, device_filter

BATCH = 1000
TOPIC_FILTER = device_filter(MessageKind.STATUS)


def own_link(bench_lab: Lab, count: int, ready: threading.Event, name: str) -> float:
    """Receive `count` messages with IngestLink; returns the monotonic time of the last ack."""
    link = IngestLink(bench_lab.cloud, name, [TOPIC_FILTER], persistent=False, receive_maximum=2 * BATCH)
    link.connect()
    ready.set()
    received = 0
    try:
        while received < count:
            batch = link.receive(1.0)
            received += len(batch)
            link.ack([inbound.packet_id for inbound in batch])
        return time.monotonic()
    finally:
        link.disconnect()


def paho_external(bench_lab: Lab, count: int, ready: threading.Event, name: str) -> float:
    """Receive `count` messages with paho's external loop and manual acks; the time of the last ack."""
    client = bench_lab.cloud.client(name)
    client.manual_ack_set(True)
    pending: list[int] = []
    received = 0

    def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += 1
        pending.append(message.mid)

    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_connect = lambda c, *_args: c.subscribe(TOPIC_FILTER, qos=1)
    bench_lab.cloud.connect(client, receive_maximum=2 * BATCH)
    client.reconnect()
    sock = client.socket()
    if sock is None:
        raise RuntimeError("paho did not open a socket")
    try:
        while received < count:
            writing = [sock] if client.want_write() else []
            readable, writable, _ = select.select([sock], writing, [], 1.0)
            if readable:
                client.loop_read(max_packets=BATCH)
            if len(pending) >= BATCH or (pending and not readable):
                for mid in pending:
                    client.ack(mid, 1)
                pending.clear()
            if writable or client.want_write():
                client.loop_write()
            client.loop_misc()
            if subscribed.is_set():
                ready.set()
        for mid in pending:
            client.ack(mid, 1)
        while client.want_write():
            client.loop_write()
        return time.monotonic()
    finally:
        client.disconnect()


CLIENTS = {"own link (cloud/ingest/link.py)": own_link, "paho, external loop": paho_external}


def measure(bench_lab: Lab, receiver: Any, count: int, name: str) -> dict[str, float]:
    messages = status_messages(count)
    ready, result = threading.Event(), dict[str, float]()
    thread = threading.Thread(
        target=lambda: result.update(done=receiver(bench_lab, count, ready, name)), daemon=True
    )
    thread.start()
    if not ready.wait(30):
        raise RuntimeError(f"{name} did not subscribe")
    time.sleep(0.5)
    started = publish(bench_lab, messages)
    thread.join(600)
    if "done" not in result:
        raise RuntimeError(f"{name} did not receive every message")
    elapsed = result["done"] - started
    return {"msg_per_s": count / elapsed, "seconds": elapsed}


def run(admin_url: str, *, count: int, rounds: int) -> dict[str, Any]:
    with lab(admin_url) as bench_lab:
        provision(bench_lab, DEVICES)
        measure(bench_lab, own_link, 2000, "warm-up")
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in CLIENTS}
        for n in range(rounds):
            for label, receiver in CLIENTS.items():
                runs[label].append(measure(bench_lab, receiver, count, f"bench-recv-{n}-{len(runs[label])}"))
    return {
        "benchmark": "ingest_link",
        "messages": count,
        "runs": runs,
        **harness.machine_keys(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "ingest_link")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    report = run(harness.postgres_url(), count=args.messages, rounds=args.rounds)
    table = harness.table(
        f"MQTT receive path: {report['messages']:,} QoS 1 messages, acked in batches of {BATCH}",
        ["client", *(f"run {n + 1} msg/s" for n in range(args.rounds))],
        left=1,
    )
    for label, runs in report["runs"].items():
        table.add_row(label, *(f"{r['msg_per_s']:,.0f}" for r in runs))
    console = Console()
    console.print(table)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
