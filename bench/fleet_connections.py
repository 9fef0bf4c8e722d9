"""Benchmark of the fleet (DESIGN §7): 2,000 concurrent authenticated device connections sending
heartbeats on one machine; presence correct for all; CPU and memory of the broker and the ingest.

mosquitto runs the production configuration; N devices are provisioned in a scratch PostgreSQL
registry and in the broker (each its own credentials and ACL role), a model of their line is
registered for them to report running, and one `diredi ingest` runs.
One process simulates the fleet (bench/device_swarm.py: paho clients on one selector loop). Phases:

1. connect: every device logs in with a retained `offline` will, then announces `online` (retained,
   QoS 1); the connect time and the failures (expected: none) are reported.
2. steady: every device sends a status heartbeat every H seconds (±10 %) for `--periods` periods;
   CPU (percent of one core) and peak RSS of mosquitto, the ingest and the simulator are measured,
   with mosquitto's open descriptors. Then the registry must show every device `online`, its
   `last_seen` within the last 2 periods, and one telemetry row per acknowledged heartbeat.
3. drop: half the devices close their socket without a DISCONNECT; the broker publishes their wills
   and exactly those must become `offline` while the rest stay `online`.

Writes bench/results/fleet_connections.json.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psutil
from rich.console import Console
from rich.progress import Progress, TaskID
from sqlalchemy import select

from bench import harness
from bench.device_swarm import SimDevice, Swarm, connected
from bench.mqtt_lab import Lab, UsageMeter, ingests, lab, provision, raise_open_files, stored_telemetry
from cloud.artifacts import LocalArtifactStore
from cloud.registry.db import transaction
from cloud.registry.models import register_cloud_model
from cloud.registry.tables import Device, Presence
from wire.common import utcnow

TARGET_CONNECTIONS = 2000
COHORT = "fleet"
SETTLE_TIMEOUT = 60.0  # seconds the registry may take to reflect what the devices did


def device_ids(count: int) -> list[str]:
    return [f"fleet-{n:05d}" for n in range(count)]


def register_model(lab: Lab) -> str:
    """A model of the fleet's line for the devices to report running: the registry records a known
    model once per device (an unknown one would cost an UPDATE on every status)."""
    store = LocalArtifactStore(lab.workdir / "artifacts")
    with transaction(lab.sessions) as session:
        return register_cloud_model(session, store, cohort_id=COHORT, weights=b"fleet benchmark").id


def registry_view(lab: Lab) -> dict[str, tuple[Presence, datetime | None]]:
    """Presence and last_seen of every device in the registry."""
    with lab.sessions() as session:
        rows = session.execute(select(Device.id, Device.presence, Device.last_seen)).all()
    return {device_id: (presence, last_seen) for device_id, presence, last_seen in rows}


def count_in(
    view: dict[str, tuple[Presence, datetime | None]], devices: list[SimDevice], state: Presence
) -> int:
    return sum(view.get(d.device_id, (Presence.unknown, None))[0] is state for d in devices)


def serve_until(swarm: Swarm, done: Callable[[], bool], timeout: float, step: float = 0.25) -> float | None:
    """Keep the fleet running until `done()`; the seconds it took, or None after `timeout`."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout:
            return None
        swarm.run_for(step)
    return time.monotonic() - started


def connect_phase(swarm: Swarm, broker: psutil.Process, progress: Progress, task: TaskID) -> dict[str, Any]:
    meter = UsageMeter([broker])
    started = time.monotonic()
    swarm.connect_all(on_answer=lambda _: progress.advance(task))
    elapsed = time.monotonic() - started
    failed = [d for d in swarm.devices if d.refused is not None]
    latencies = sorted(
        1000 * (d.connack_at - d.connect_started) for d in swarm.devices if d.connack_at is not None
    )
    usage = meter.done()
    return {
        "seconds": elapsed,
        "per_s": len(swarm.devices) / elapsed,
        "connected": len(connected(swarm.devices)),
        "failures": len(failed),
        "failure_examples": sorted({f"{d.device_id}: {d.refused}" for d in failed})[:5],
        "connack_ms_p50": statistics.median(latencies) if latencies else None,
        "connack_ms_p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "broker_cpu_percent": usage.cpu_percent,
    }


def steady_phase(
    lab: Lab,
    swarm: Swarm,
    processes: dict[str, psutil.Process],
    *,
    seconds: float,
    progress: Progress,
    task: TaskID,
) -> dict[str, Any]:
    meters = {name: UsageMeter([process]) for name, process in processes.items()}
    stored0, sent0 = stored_telemetry(lab), swarm.counters.heartbeats_sent
    started = time.monotonic()
    fds = 0
    while (left := started + seconds - time.monotonic()) > 0:
        swarm.run_for(min(1.0, left))
        for meter in meters.values():
            meter.sample()
        fds = max(fds, processes["mosquitto"].num_fds())
        progress.update(task, completed=min(seconds, time.monotonic() - started))
    elapsed = time.monotonic() - started
    usage = {name: meter.done() for name, meter in meters.items()}
    sent = swarm.counters.heartbeats_sent - sent0
    stored = stored_telemetry(lab) - stored0
    return {
        "seconds": elapsed,
        "heartbeats_per_s": sent / elapsed,
        "telemetry_rows_per_s": stored / elapsed,
        "mosquitto_fds": fds,
        **{f"{name}_cpu_percent": u.cpu_percent for name, u in usage.items()},
        **{f"{name}_rss_mb": u.rss_mb for name, u in usage.items()},
    }


def check_steady(lab: Lab, swarm: Swarm, heartbeat_s: float) -> dict[str, Any]:
    """Heartbeats paused: every acknowledged one stored; every device online and seen lately."""
    swarm.heartbeats_paused = True
    swarm.run_for(1.0)  # the last PUBACKs
    expected = swarm.counters.heartbeats_acked
    caught_up = serve_until(swarm, lambda: stored_telemetry(lab) >= expected, SETTLE_TIMEOUT)
    stored = stored_telemetry(lab)
    now = utcnow()
    view = registry_view(lab)
    recent = now - timedelta(seconds=2 * heartbeat_s)
    devices = swarm.devices
    swarm.heartbeats_paused = False
    return {
        "heartbeats_sent": swarm.counters.heartbeats_sent,
        "heartbeats_acknowledged": expected,
        "publishes_refused": swarm.counters.refused_publishes,
        "telemetry_rows": stored,
        "telemetry_ok": stored == expected if swarm.qos else stored >= 0.99 * expected,
        "ingest_caught_up_s": caught_up,
        "online": count_in(view, devices, Presence.online),
        "last_seen_within_2_periods": sum(
            (seen := view.get(d.device_id, (Presence.unknown, None))[1]) is not None and seen >= recent
            for d in devices
        ),
        "connections_lost": swarm.counters.lost,
    }


def drop_phase(lab: Lab, swarm: Swarm, progress: Progress, task: TaskID) -> dict[str, Any]:
    dropped, kept = swarm.devices[::2], swarm.devices[1::2]
    swarm.drop(dropped)
    offline = 0

    def all_offline() -> bool:
        nonlocal offline
        offline = count_in(registry_view(lab), dropped, Presence.offline)
        progress.update(task, completed=offline)
        return offline == len(dropped)

    seconds = serve_until(swarm, all_offline, SETTLE_TIMEOUT)
    swarm.run_for(2.0)  # anything late would show now
    view = registry_view(lab)
    return {
        "dropped": len(dropped),
        "dropped_offline": count_in(view, dropped, Presence.offline),
        "kept": len(kept),
        "kept_online": count_in(view, kept, Presence.online),
        "kept_connected": len(connected(kept)),
        "all_offline_after_s": seconds,
    }


def run(admin_url: str, *, count: int, heartbeat_s: float, periods: float, qos: int) -> dict[str, Any]:
    raise_open_files(count + 1024)
    with lab(admin_url) as bench_lab, Progress(transient=True) as progress:
        provisioning = progress.add_task(f"provision {count:,} devices", total=1)
        started = time.monotonic()
        secrets_by_id = provision(bench_lab, device_ids(count), cohort=COHORT, broker_stopped=True)
        model_id = register_model(bench_lab)
        provision_s = time.monotonic() - started
        progress.advance(provisioning)
        with ingests(bench_lab, 1) as (ingest,):
            broker = psutil.Process(bench_lab.broker.pid or 0)
            broker_idle_mb = broker.memory_info().rss / 2**20
            swarm = Swarm(
                bench_lab.target, secrets_by_id, heartbeat_s=heartbeat_s, qos=qos, model_id=model_id
            )
            try:
                task = progress.add_task("connect", total=count)
                connect = connect_phase(swarm, broker, progress, task)
                online_s = serve_until(
                    swarm,
                    lambda: (
                        count_in(registry_view(bench_lab), swarm.devices, Presence.online)
                        == connect["connected"]
                    ),
                    SETTLE_TIMEOUT,
                )
                connect["registry_online_after_s"] = online_s
                seconds = periods * heartbeat_s
                task = progress.add_task(f"heartbeats for {seconds:g} s", total=seconds)
                processes = {"mosquitto": broker, "ingest": ingest, "simulator": psutil.Process()}
                steady = steady_phase(
                    bench_lab, swarm, processes, seconds=seconds, progress=progress, task=task
                )
                steady |= check_steady(bench_lab, swarm, heartbeat_s)
                task = progress.add_task("drop half, wait for offline", total=count // 2 + count % 2)
                drop = drop_phase(bench_lab, swarm, progress, task)
            finally:
                swarm.close()
    steady["mosquitto_rss_mb_before_connections"] = broker_idle_mb
    ok = (
        connect["failures"] == 0
        and steady["online"] == count
        and steady["last_seen_within_2_periods"] == count
        and steady["telemetry_ok"]
        and steady["connections_lost"] == 0
        and drop["dropped_offline"] == drop["dropped"]
        and drop["kept_online"] == drop["kept"]
    )
    return {
        "benchmark": "fleet_connections",
        "devices": count,
        "heartbeat_s": heartbeat_s,
        "heartbeat_qos": qos,
        "provision_seconds": provision_s,
        "connect": connect,
        "steady": steady,
        "drop": drop,
        "ok": ok,
        "meets_target": ok and connect["connected"] >= TARGET_CONNECTIONS,
        "target_connections": TARGET_CONNECTIONS,
        **harness.machine_keys(),
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    c, s, d, n = report["connect"], report["steady"], report["drop"], report["devices"]

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    def secs(value: float | None) -> str:
        return "timed out" if value is None else f"{value:.1f} s"

    title = (
        f"Fleet: {n:,} authenticated devices on one mosquitto, heartbeat every {report['heartbeat_s']:g} s "
        f"(QoS {report['heartbeat_qos']}), 1 ingest ({report['cpus']} CPUs)"
    )
    table = harness.table(title, ("figure", "value", "ok"), left=1)
    connack = f"{c['connack_ms_p50'] or 0:.0f} / {c['connack_ms_p99'] or 0:.0f} ms"
    rows_stored = f"{s['telemetry_rows']:,} / {s['heartbeats_acknowledged']:,}"
    broker = f"{s['mosquitto_cpu_percent']:.1f} / {s['mosquitto_rss_mb']:.0f} / {s['mosquitto_fds']:,}"
    offline = f"{d['dropped_offline']:,} / {d['dropped']:,} in {secs(d['all_offline_after_s'])}"
    seen = s["last_seen_within_2_periods"]
    rows = [
        ("concurrent connections", f"{c['connected']:,}", yes(c["connected"] >= TARGET_CONNECTIONS)),
        ("connect all (CONNACK p50 / p99)", f"{c['seconds']:.1f} s ({connack})", ""),
        ("connect failures", f"{c['failures']}", yes(c["failures"] == 0)),
        ("registry shows all online after", secs(c["registry_online_after_s"]), ""),
        ("heartbeats / s (steady)", f"{s['heartbeats_per_s']:.0f}", ""),
        ("telemetry rows / s (steady)", f"{s['telemetry_rows_per_s']:.0f}", ""),
        ("telemetry rows / heartbeats acknowledged", rows_stored, yes(s["telemetry_ok"])),
        ("online in the registry", f"{s['online']:,} / {n:,}", yes(s["online"] == n)),
        ("last_seen within 2 periods", f"{seen:,} / {n:,}", yes(seen == n)),
        ("connections lost", f"{s['connections_lost']}", yes(s["connections_lost"] == 0)),
        ("mosquitto CPU % / RSS MB / fds", broker, ""),
        ("ingest CPU % / RSS MB", f"{s['ingest_cpu_percent']:.1f} / {s['ingest_rss_mb']:.0f}", ""),
        ("simulator CPU % / RSS MB", f"{s['simulator_cpu_percent']:.1f} / {s['simulator_rss_mb']:.0f}", ""),
        ("dropped → offline", offline, yes(d["dropped_offline"] == d["dropped"])),
        ("kept → still online", f"{d['kept_online']:,} / {d['kept']:,}", yes(d["kept_online"] == d["kept"])),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "fleet_connections")
    parser.add_argument("--devices", type=int, default=TARGET_CONNECTIONS)
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between two heartbeats")
    parser.add_argument("--periods", type=float, default=2.0, help="heartbeat periods of steady state")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1, help="QoS of the heartbeats")
    args = parser.parse_args(argv)
    admin_url = harness.postgres_url()
    console = Console()
    report = run(
        admin_url, count=args.devices, heartbeat_s=args.heartbeat, periods=args.periods, qos=args.qos
    )
    print_table(report, console)
    harness.write_results(report, args.out, console)
    if not report["ok"]:
        raise SystemExit("fleet benchmark: a check failed (see the table)")


if __name__ == "__main__":
    main()
