"""Benchmark of the fleet (DESIGN §7, issue 18): 2,000 concurrent devices sending heartbeats on one
machine, logging in by password or by certificate (mutual TLS); presence correct for all; connect time,
CONNACK latency, CPU and memory of the broker and the ingest, the two identities side by side.

For each identity (`--identity password|certificate|both`, both by default: the same N, one after the
other, each on a mosquitto and a scratch PostgreSQL registry of its own), N devices are provisioned and
a model of their line is registered for them to report running, and one `diredi ingest` runs:

- password: mosquitto's password configuration; each device its own dynamic-security client and ACL
  role (written into the broker's file while it is stopped, bench/mqtt_lab.py) and registry row; the
  devices log in with their id and secret on the TLS listener (server authentication), as deployed
  (`--password-listener plain`: on the loopback plain listener instead, as this bench did before);
- certificate: mosquitto's certificate configuration; each device an EC P-256 key of its own and a
  certificate of the fleet CA from its CSR, registered in the registry by its certificate, the broker
  told nothing; the devices log in on the mutual-TLS listener, the ingest on the services' listener.
  Making the keys and certificates is timed apart, outside the connect figures.

One process simulates the fleet (bench/device_swarm.py: paho clients on one selector loop, which also
drives the TLS handshakes, at most 100 connections waiting for their CONNACK at once). Phases:

1. connect: every device logs in with a retained `offline` will, then announces `online` (retained,
   QoS 1); the time to connect all, the CONNACK latency (from opening the socket, TLS handshake
   included) and the handshake's, failures (expected: none), and the broker's CPU seconds over the
   phase and RSS after it.
2. steady: every device sends a status heartbeat every H seconds (±10 %) for `--periods` periods;
   CPU (percent of one core) and peak RSS of mosquitto, the ingest and the simulator are measured,
   with mosquitto's open descriptors. Then the registry must show every device `online`, its
   `last_seen` within the last 2 periods, and one telemetry row per acknowledged heartbeat.
3. drop: half the devices close their socket without a DISCONNECT; the broker publishes their wills
   and exactly those must become `offline` while the rest stay `online`.

Writes bench/results/fleet_connections.json: one section per identity and, for both, the ratios
certificate / password.
"""

from __future__ import annotations

import ssl
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import psutil
from rich.console import Console
from rich.progress import Progress, TaskID
from sqlalchemy import select

from bench import harness
from bench.device_swarm import SimDevice, Swarm, connected
from bench.mqtt_lab import (
    CpuSplit,
    DeviceIdentity,
    Lab,
    UsageMeter,
    ingests,
    lab,
    provision,
    provision_certificates,
    raise_open_files,
    stored_telemetry,
)
from cloud.artifacts import LocalArtifactStore
from cloud.registry.db import transaction
from cloud.registry.models import register_cloud_model
from cloud.registry.tables import Device, Presence
from wire.common import utcnow

TARGET_CONNECTIONS = 2000
COHORT = "fleet"
SETTLE_TIMEOUT = 60.0  # seconds the registry may take to reflect what the devices did
CONNECT_TIMEOUT = 300.0  # seconds the whole fleet may take to connect
IDENTITIES: tuple[DeviceIdentity, ...] = ("password", "certificate")
# What the report compares, certificate / password: (section, figure) by name.
RATIOS = {
    "connect_s": ("connect", "seconds"),
    "connack_ms_p50": ("connect", "connack_ms_p50"),
    "connack_ms_p99": ("connect", "connack_ms_p99"),
    "handshake_ms_p50": ("connect", "handshake_ms_p50"),
    "handshake_ms_p99": ("connect", "handshake_ms_p99"),
    "broker_connect_cpu_s": ("connect", "broker_cpu_s"),
    "broker_rss_mb_after_connect": ("connect", "broker_rss_mb_after"),
    "mosquitto_steady_cpu_percent": ("steady", "mosquitto_cpu_percent"),
    "ingest_steady_cpu_percent": ("steady", "ingest_cpu_percent"),
}


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


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (nearest rank below) of `values`, or None for none."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else None


def tls_session(devices: Sequence[SimDevice]) -> str | None:
    """The TLS version and cipher a connected device negotiated, or None on a plain listener."""
    for device in connected(devices):
        sock = device.client.socket()
        if isinstance(sock, ssl.SSLSocket):
            cipher = sock.cipher()
            return f"{sock.version()} {cipher[0] if cipher else ''}".strip()
    return None


def connect_phase(swarm: Swarm, broker: psutil.Process, progress: Progress, task: TaskID) -> dict[str, Any]:
    meters = UsageMeter([broker]), UsageMeter([psutil.Process()])
    machine = CpuSplit({})  # what else ran meanwhile (the ingest, PostgreSQL, anything on the machine)
    started = time.monotonic()
    swarm.connect_all(on_answer=lambda _: progress.advance(task), timeout=CONNECT_TIMEOUT)
    elapsed = time.monotonic() - started
    usage, simulator = (meter.done() for meter in meters)
    busy = machine.done(1)
    failed = [d for d in swarm.devices if d.refused is not None]
    answered = [d for d in swarm.devices if d.connack_at is not None]
    shaken = [d for d in swarm.devices if d.handshake_at is not None]
    connack_ms = [1000 * (d.connack_at - d.connect_started) for d in answered if d.connack_at]
    handshake_ms = [1000 * (d.handshake_at - d.connect_started) for d in shaken if d.handshake_at]
    return {
        "seconds": elapsed,
        "per_s": len(swarm.devices) / elapsed,
        "connected": len(connected(swarm.devices)),
        "failures": len(failed),
        "handshake_failures": swarm.counters.handshake_failures,
        "failure_examples": sorted({f"{d.device_id}: {d.refused}" for d in failed})[:5],
        "connack_ms_p50": statistics.median(connack_ms) if connack_ms else None,
        "connack_ms_p99": percentile(connack_ms, 0.99),
        "handshake_ms_p50": statistics.median(handshake_ms) if handshake_ms else None,
        "handshake_ms_p99": percentile(handshake_ms, 0.99),
        "tls": tls_session(swarm.devices),
        "broker_cpu_s": usage.cpu_s,
        "broker_cpu_percent": usage.cpu_percent,
        "broker_rss_mb_after": broker.memory_info().rss / 2**20,
        "simulator_cpu_s": simulator.cpu_s,
        "others_cpu_s": max(busy["total"] / 1e6 - usage.cpu_s - simulator.cpu_s, 0.0),
        "machine_busy_percent": busy["busy_percent"],
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


def fleet(
    bench_lab: Lab, identity: DeviceIdentity, count: int, *, plain_listener: bool
) -> tuple[Swarm, dict[str, float]]:
    """Provision `count` devices of `identity` and make the swarm of them (not yet connected); the
    seconds each step took. Password devices log in on the TLS listener, or the plain one."""
    ids = device_ids(count)
    if identity == "certificate":
        assert bench_lab.tls_target is not None  # noqa: S101 (a certificate lab has its mTLS listener)
        made = provision_certificates(bench_lab, ids, cohort=COHORT)
        started = time.monotonic()
        swarm = Swarm(bench_lab.tls_target, {}, certificates=made.files)
        return swarm, made.seconds | {"clients": time.monotonic() - started}
    started = time.monotonic()
    secrets_by_id = provision(bench_lab, ids, cohort=COHORT, broker_stopped=True)
    seconds = {"registry_and_broker": time.monotonic() - started}
    target = bench_lab.target if plain_listener else bench_lab.tls_target
    assert target is not None  # noqa: S101 (the password lab has both listeners)
    started = time.monotonic()
    swarm = Swarm(target, secrets_by_id)
    return swarm, seconds | {"clients": time.monotonic() - started}


def run_identity(
    admin_url: str,
    identity: DeviceIdentity,
    *,
    count: int,
    heartbeat_s: float,
    periods: float,
    qos: int,
    plain_listener: bool = False,
) -> dict[str, Any]:
    """Every phase for devices of one identity, on a broker and a registry of their own."""
    with lab(admin_url, devices=identity) as bench_lab, Progress(transient=True) as progress:
        provisioning = progress.add_task(f"{identity}: provision {count:,} devices", total=1)
        swarm, provision_s = fleet(bench_lab, identity, count, plain_listener=plain_listener)
        model_id = register_model(bench_lab)
        progress.advance(provisioning)
        swarm.model_id, swarm.heartbeat_s, swarm.qos = model_id, heartbeat_s, qos
        with ingests(bench_lab, 1) as (ingest,):
            broker = psutil.Process(bench_lab.broker.pid or 0)
            broker_idle_mb = broker.memory_info().rss / 2**20
            try:
                task = progress.add_task(f"{identity}: connect", total=count)
                connect = connect_phase(swarm, broker, progress, task)
                connect["broker_rss_mb_before"] = broker_idle_mb
                connect["registry_online_after_s"] = serve_until(
                    swarm,
                    lambda: (
                        count_in(registry_view(bench_lab), swarm.devices, Presence.online)
                        == connect["connected"]
                    ),
                    SETTLE_TIMEOUT,
                )
                seconds = periods * heartbeat_s
                task = progress.add_task(f"{identity}: heartbeats for {seconds:g} s", total=seconds)
                processes = {"mosquitto": broker, "ingest": ingest, "simulator": psutil.Process()}
                steady = steady_phase(
                    bench_lab, swarm, processes, seconds=seconds, progress=progress, task=task
                )
                steady |= check_steady(bench_lab, swarm, heartbeat_s)
                task = progress.add_task(
                    f"{identity}: drop half, wait for offline", total=count // 2 + count % 2
                )
                drop = drop_phase(bench_lab, swarm, progress, task)
            finally:
                swarm.close()
    steady["mosquitto_rss_mb_before_connections"] = broker_idle_mb
    ok = (
        connect["failures"] == 0
        and connect["handshake_failures"] == 0
        and steady["online"] == count
        and steady["last_seen_within_2_periods"] == count
        and steady["telemetry_ok"]
        and steady["connections_lost"] == 0
        and drop["dropped_offline"] == drop["dropped"]
        and drop["kept_online"] == drop["kept"]
    )
    return {
        "listener": "mutual TLS" if identity == "certificate" else "plain" if plain_listener else "TLS",
        "provision_seconds": provision_s,
        "connect": connect,
        "steady": steady,
        "drop": drop,
        "ok": ok,
    }


def ratios(password: dict[str, Any], certificate: dict[str, Any]) -> dict[str, float | None]:
    """Certificate / password for each figure of RATIOS (None where the password figure is none or 0)."""
    found: dict[str, float | None] = {}
    for name, (section, key) in RATIOS.items():
        base, other = password[section].get(key), certificate[section].get(key)
        found[name] = other / base if base and other is not None else None
    return found


def run(
    admin_url: str,
    *,
    count: int,
    heartbeat_s: float,
    periods: float,
    qos: int,
    identities: Sequence[DeviceIdentity] = IDENTITIES,
    plain_listener: bool = False,
) -> dict[str, Any]:
    """The benchmark for each identity in turn, with the same fleet; the report."""
    raise_open_files(count + 1024)  # the simulator holds one socket per device
    results: dict[str, dict[str, Any]] = {
        identity: run_identity(
            admin_url,
            identity,
            count=count,
            heartbeat_s=heartbeat_s,
            periods=periods,
            qos=qos,
            plain_listener=plain_listener,
        )
        for identity in identities
    }
    both = "password" in results and "certificate" in results
    ok = all(result["ok"] for result in results.values())
    return {
        "benchmark": "fleet_connections",
        "devices": count,
        "identities": list(results),
        "heartbeat_s": heartbeat_s,
        "heartbeat_qos": qos,
        **results,
        "certificate_over_password": ratios(results["password"], results["certificate"]) if both else None,
        "ok": ok,
        "meets_target": ok
        and all(result["connect"]["connected"] >= TARGET_CONNECTIONS for result in results.values()),
        "target_connections": TARGET_CONNECTIONS,
        **harness.machine_keys(),
    }


def cells(r: dict[str, Any], count: int) -> list[tuple[str, str, bool | None]]:
    """One identity's column of the table: label, figure, and whether its check passed (None: none)."""
    c, s, d = r["connect"], r["steady"], r["drop"]

    def secs(value: float | None) -> str:
        return "timed out" if value is None else f"{value:.1f} s"

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value:.0f} ms"

    steps = " + ".join(f"{v:.1f} {k.replace('_', ' ')}" for k, v in r["provision_seconds"].items())
    seen = s["last_seen_within_2_periods"]
    return [
        ("listener", r["listener"], None),
        ("provision in s (apart from connect)", steps, None),
        ("concurrent connections", f"{c['connected']:,}", c["connected"] >= min(count, TARGET_CONNECTIONS)),
        ("connect all", secs(c["seconds"]), None),
        ("CONNACK p50", ms(c["connack_ms_p50"]), None),
        ("CONNACK p99", ms(c["connack_ms_p99"]), None),
        ("TLS handshake done p50 / p99", f"{ms(c['handshake_ms_p50'])} / {ms(c['handshake_ms_p99'])}", None),
        ("TLS", c["tls"] or "none", None),
        (
            "handshake failures / connect failures",
            f"{c['handshake_failures']} / {c['failures']}",
            c["failures"] == 0,
        ),
        ("broker CPU s during connect", f"{c['broker_cpu_s']:.2f}", None),
        ("simulator CPU s during connect", f"{c['simulator_cpu_s']:.2f}", None),
        (
            "rest of the machine: CPU s / busy % during connect",
            f"{c['others_cpu_s']:.1f} / {c['machine_busy_percent']:.0f} %",
            None,
        ),
        (
            "broker RSS MB idle → after connect",
            f"{c['broker_rss_mb_before']:.0f} → {c['broker_rss_mb_after']:.0f}",
            None,
        ),
        ("registry shows all online after", secs(c["registry_online_after_s"]), None),
        ("heartbeats / s (steady)", f"{s['heartbeats_per_s']:.0f}", None),
        (
            "telemetry rows / heartbeats acknowledged",
            f"{s['telemetry_rows']:,} / {s['heartbeats_acknowledged']:,}",
            bool(s["telemetry_ok"]),
        ),
        ("online in the registry", f"{s['online']:,} / {count:,}", s["online"] == count),
        ("last_seen within 2 periods", f"{seen:,} / {count:,}", seen == count),
        ("connections lost", f"{s['connections_lost']}", s["connections_lost"] == 0),
        (
            "mosquitto CPU % / RSS MB / fds (steady)",
            f"{s['mosquitto_cpu_percent']:.1f} / {s['mosquitto_rss_mb']:.0f} / {s['mosquitto_fds']:,}",
            None,
        ),
        ("ingest CPU % / RSS MB (steady)", f"{s['ingest_cpu_percent']:.1f} / {s['ingest_rss_mb']:.0f}", None),
        (
            "simulator CPU % / RSS MB (steady)",
            f"{s['simulator_cpu_percent']:.1f} / {s['simulator_rss_mb']:.0f}",
            None,
        ),
        (
            "dropped → offline",
            f"{d['dropped_offline']:,} / {d['dropped']:,} in {secs(d['all_offline_after_s'])}",
            d["dropped_offline"] == d["dropped"],
        ),
        ("kept → still online", f"{d['kept_online']:,} / {d['kept']:,}", d["kept_online"] == d["kept"]),
    ]


# The ratio (RATIOS) shown on a row of the table, by its label.
ROW_RATIOS = {
    "connect all": "connect_s",
    "CONNACK p50": "connack_ms_p50",
    "CONNACK p99": "connack_ms_p99",
    "TLS handshake done p50 / p99": "handshake_ms_p99",
    "broker CPU s during connect": "broker_connect_cpu_s",
    "broker RSS MB idle → after connect": "broker_rss_mb_after_connect",
    "mosquitto CPU % / RSS MB / fds (steady)": "mosquitto_steady_cpu_percent",
    "ingest CPU % / RSS MB (steady)": "ingest_steady_cpu_percent",
}


def print_table(report: dict[str, Any], console: Console) -> None:
    """The identities side by side, with the ratio certificate / password when both ran."""
    identities, n = report["identities"], report["devices"]
    compared = report["certificate_over_password"]
    title = (
        f"Fleet: {n:,} devices on one mosquitto per identity, heartbeat every {report['heartbeat_s']:g} s "
        f"(QoS {report['heartbeat_qos']}), 1 ingest ({report['cpus']} CPUs)"
    )
    columns = ["figure", *identities, *(["certificate / password"] if compared else []), "ok"]
    table = harness.table(title, columns, left=1)
    by_identity = {identity: cells(report[identity], n) for identity in identities}
    for row, (label, *_) in enumerate(by_identity[identities[0]]):
        figures = [by_identity[identity][row][1] for identity in identities]
        if compared:
            ratio = compared.get(ROW_RATIOS.get(label, ""))
            figures.append("" if ratio is None else f"{ratio:.2f}×")
        checks = {identity: by_identity[identity][row][2] for identity in identities}
        failing = [identity for identity, passed in checks.items() if passed is False]
        verdict = (
            ""
            if all(v is None for v in checks.values())
            else f"NO ({', '.join(failing)})"
            if failing
            else "yes"
        )
        table.add_row(label, *figures, verdict)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "fleet_connections")
    parser.add_argument("--devices", type=int, default=TARGET_CONNECTIONS)
    parser.add_argument(
        "--identity",
        choices=(*IDENTITIES, "both"),
        default="both",
        help="how the devices log in: password, certificate (mutual TLS), or both side by side",
    )
    parser.add_argument(
        "--password-listener",
        dest="listener",
        choices=("tls", "plain"),
        default="tls",
        help="the listener password devices use: TLS as deployed, or the loopback plain one",
    )
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between two heartbeats")
    parser.add_argument("--periods", type=float, default=2.0, help="heartbeat periods of steady state")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1, help="QoS of the heartbeats")
    args = parser.parse_args(argv)
    admin_url = harness.postgres_url()
    console = Console()
    report = run(
        admin_url,
        count=args.devices,
        heartbeat_s=args.heartbeat,
        periods=args.periods,
        qos=args.qos,
        identities=IDENTITIES if args.identity == "both" else (args.identity,),
        plain_listener=args.listener == "plain",
    )
    print_table(report, console)
    harness.write_results(report, args.out, console)
    if not report["ok"]:
        raise SystemExit("fleet benchmark: a check failed (see the table)")


if __name__ == "__main__":
    main()
