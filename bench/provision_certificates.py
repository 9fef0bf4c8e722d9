"""Benchmark of provisioning (issue 18): certificate devices through the API leave the broker as it
was, where password devices grow its state; time, broker memory and the broker's state files.

One mosquitto in certificate mode (devices by fleet-CA certificate on a mutual-TLS listener, services on
dynamic security), a migrated scratch PostgreSQL registry, and `diredi api` on loopback with the
broker's credential hook (DIREDI_MQTT_ADMIN_URL), as operators run it. Phases:

1. keys: every certificate device's EC P-256 key and CSR are made beforehand and timed apart (on a
   real fleet each device makes its own);
2. certificates: `--devices` POST /api/v1/devices {id, cohort_id, csr} from `--clients` concurrent
   clients; total time, devices/s, p50/p99 per request. The broker's RSS and its state files
   (dynamic-security JSON, persistence db, devices' ACL) are read before and after: they must not move;
3. passwords: `--password-devices` devices without a CSR through the same API, whose hook makes a
   dynamic-security client and role for each (mosquitto rewrites its whole JSON file per command): the
   same figures, and the time for 2,000 extrapolated to compare with issue 18's reference (136 s for
   2,000 password devices, docs/mqtt.md). Here they are accounts on the services' listener (this broker
   has no password listener for devices), which the broker stores and rewrites alike;
4. the first and the last certificate device connect to the device listener: the broker admits devices
   it was never told of.

Writes bench/results/provision_certificates.json.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.console import Console
from rich.progress import Progress, TaskID

from bench import harness
from bench.api_listing import api_server, nearest_rank
from bench.mqtt_lab import CERTS_SCRIPT, CLOUD_USER
from broker.client import BrokerTarget, ClientOptions
from broker.connection import BrokerConnection
from broker.exceptions import BrokerConnectError
from broker.mosquitto import DEVICE_ACL_NAME, DYNSEC_NAME, bootstrap, init_dynsec, render_config
from cloud.children import free_ports
from cloud.fleet_ca import FleetCA
from cloud.registry import apikeys, migrate
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.devices import create_cohort
from cloud.registry.tables import Role
from device_firmware_py.identity import signing_request
from testsupport.mosquitto import MosquittoProcess
from testsupport.postgres import scratch_database

COHORT = "fleet"
PERSISTENCE_NAME = "mosquitto.db"  # broker/mosquitto.conf's persistence_file
STATE_FILES = (DYNSEC_NAME, PERSISTENCE_NAME, DEVICE_ACL_NAME)
# Files whose content must not change at all. The persistence file's header holds the broker's
# message counter, which its $SYS messages move every 10 s: its size is what would grow with a fleet.
SAME_CONTENT = (DYNSEC_NAME, DEVICE_ACL_NAME)
REFERENCE = {"password_devices": 2000, "seconds": 136.0, "source": "docs/mqtt.md (issue 18)"}
RSS_NOISE_MB = 0.5  # the broker's RSS may move this much with nothing to do (allocator, the save)
SAVE_TIMEOUT = 30.0
TIMEOUT = 60.0  # seconds one request may take: a password device's at the end of a large file


@dataclass
class CertificateLab:
    """mosquitto in certificate mode, its fleet CA and a migrated scratch registry."""

    broker: MosquittoProcess
    admin: BrokerTarget  # the dynamic-security admin on the services' listener (TLS)
    devices: BrokerTarget  # the devices' mutual-TLS listener, no identity
    server_ca: Path  # the lab CA that signed the broker's TLS certificate
    fleet_ca: FleetCA
    database_url: str
    workdir: Path


@contextmanager
def certificate_lab(admin_database_url: str) -> Iterator[CertificateLab]:
    """The broker in certificate mode on free loopback ports (lab TLS certificates, a fleet CA with an
    empty CRL, dynamic security with an admin and the cloud's account) and a migrated scratch registry."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diredi-bench-")))
        certs, state = workdir / "certs", workdir / "broker"
        subprocess.run([str(CERTS_SCRIPT), str(certs)], check=True, capture_output=True, timeout=60)  # noqa: S603
        ca = FleetCA.open(workdir / "fleet-ca")
        service_port, device_port = free_ports(2)
        render_config(
            state,
            port=service_port,
            tls_port=device_port,
            cert_dir=certs,
            tls_bind="127.0.0.1",
            devices="certificate",
            fleet_ca=ca.directory / "ca.pem",
            crl_file=ca.write_crl([]),
        )
        admin_password = secrets.token_urlsafe(24)
        init_dynsec(state, admin_user="admin", admin_password=admin_password)
        process = stack.enter_context(MosquittoProcess(state, port=service_port))
        services = BrokerTarget("127.0.0.1", service_port, tls=True, ca_file=certs / "ca.crt")
        admin = services.with_credentials("admin", admin_password)
        bootstrap(admin, cloud_user=CLOUD_USER, cloud_password=secrets.token_urlsafe(24))
        url = stack.enter_context(scratch_database(admin_database_url, prefix="diredi_bench"))
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        devices = BrokerTarget("127.0.0.1", device_port, tls=True, ca_file=certs / "ca.crt")
        yield CertificateLab(process, admin, devices, certs / "ca.crt", ca, url, workdir)


def seed(lab: CertificateLab) -> str:
    """The devices' cohort; an operator's API key."""
    engine = make_engine(lab.database_url)
    with transaction(session_factory(engine)) as session:
        create_cohort(session, cohort_id=COHORT)
        _, key = apikeys.create_key(session, role=Role.operator, name="bench")
    engine.dispose()
    return key


def api_env(lab: CertificateLab) -> dict[str, str]:
    """What `diredi api` needs to run with this broker's hook and this fleet CA."""
    return {
        "DIREDI_MQTT_ADMIN_URL": lab.admin.url(),
        "DIREDI_MQTT_CA_FILE": str(lab.server_ca),
        "DIREDI_FLEET_CA_DIR": str(lab.fleet_ca.directory),
    }


def make_requests(
    device_ids: Sequence[str], progress: Progress, keep: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, ec.EllipticCurvePrivateKey], float]:
    """Each device's provisioning request with a CSR for a new key; the keys of `keep`; the seconds."""
    task = progress.add_task(f"keys and CSRs for {len(device_ids):,} devices", total=len(device_ids))
    bodies, kept = [], {}
    started = time.monotonic()
    for device_id in device_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        bodies.append({"id": device_id, "cohort_id": COHORT, "csr": signing_request(key, device_id)})
        if device_id in keep:
            kept[device_id] = key
        progress.advance(task)
    return bodies, kept, time.monotonic() - started


def broker_pid(broker: MosquittoProcess) -> int:
    if broker.pid is None:
        raise RuntimeError(f"mosquitto is not running:\n{broker.log_tail()}")
    return broker.pid


def save_persistence(broker: MosquittoProcess) -> None:
    """Have mosquitto write its persistence file now (SIGUSR1) and wait until it has (else it writes
    it every `autosave_interval`)."""
    db, log = broker.state_dir / PERSISTENCE_NAME, broker.log_path
    saves = log.read_text(errors="replace").count("Saving in-memory database")
    before = db.stat().st_mtime_ns if db.exists() else None
    os.kill(broker_pid(broker), signal.SIGUSR1)
    deadline = time.monotonic() + SAVE_TIMEOUT
    while time.monotonic() < deadline:
        logged = log.read_text(errors="replace").count("Saving in-memory database") > saves
        written = db.exists() and db.stat().st_mtime_ns != before
        if logged and written and not db.with_suffix(".db.new").exists():
            return
        time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not save its persistence file:\n{broker.log_tail()}")


def broker_state(broker: MosquittoProcess) -> dict[str, Any]:
    """The broker's RSS and its state files (size and SHA-256; None where absent), after a save."""
    save_persistence(broker)
    files: dict[str, dict[str, Any] | None] = {}
    for name in STATE_FILES:
        path = broker.state_dir / name
        data = path.read_bytes() if path.exists() else None
        files[name] = (
            None if data is None else {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    rss = psutil.Process(broker_pid(broker)).memory_info().rss
    return {"rss_mb": rss / 2**20, "files": files}


def state_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How the broker moved between two `broker_state` readings."""
    deltas = {
        name: (after["files"][name] or {"bytes": 0})["bytes"]
        - (before["files"][name] or {"bytes": 0})["bytes"]
        for name in STATE_FILES
    }
    return {
        "rss_delta_mb": after["rss_mb"] - before["rss_mb"],
        "state_bytes_delta": deltas,
        "state_files_unchanged": not any(deltas.values())
        and all(before["files"][name] == after["files"][name] for name in SAME_CONTENT),
        "rss_held": after["rss_mb"] - before["rss_mb"] <= RSS_NOISE_MB,
    }


def provision(
    base: str,
    api_key: str,
    bodies: Sequence[dict[str, Any]],
    *,
    clients: int,
    progress: Progress,
    task: TaskID,
) -> dict[str, Any]:
    """POST every body from `clients` concurrent keep-alive clients; the figures and the responses."""
    work = iter(bodies)
    lock = threading.Lock()
    latencies: list[float] = []
    completions: list[float] = []
    failures: list[str] = []
    responses: dict[str, dict[str, Any]] = {}

    def client(http: httpx.Client) -> None:
        while True:
            with lock:
                body = next(work, None)
            if body is None:
                return
            sent = time.monotonic()
            response = http.post("/api/v1/devices", json=body)
            done = time.monotonic()
            with lock:
                latencies.append(1000 * (done - sent))
                completions.append(done - started)
                if response.status_code == 201:
                    responses[body["id"]] = response.json()
                else:
                    failures.append(f"{body['id']}: {response.status_code} {response.text[:200]}")
            progress.advance(task)

    headers = {"Authorization": f"Bearer {api_key}"}
    with ExitStack() as stack, ThreadPoolExecutor(clients) as pool:
        # Made before the clock starts: each builds an SSL context, tens of milliseconds.
        https = [
            stack.enter_context(httpx.Client(base_url=base, headers=headers, timeout=TIMEOUT))
            for _ in range(clients)
        ]
        started = time.monotonic()
        for future in [pool.submit(client, http) for http in https]:
            future.result()
        elapsed = time.monotonic() - started
    latencies.sort()
    completions.sort()
    return {
        "devices": len(bodies),
        "seconds": elapsed,
        "per_s": len(bodies) / elapsed,
        "p50_ms": nearest_rank(latencies, 0.50),
        "p99_ms": nearest_rank(latencies, 0.99),
        "failures": len(failures),
        "failure_examples": failures[:5],
        "ms_per_device_first_tenth": tenth_cost(completions, first=True),
        "ms_per_device_last_tenth": tenth_cost(completions, first=False),
        "responses": responses,
        "completions": completions,
    }


def tenth_cost(completions: list[float], *, first: bool) -> float:
    """Wall-clock milliseconds per device over the first or the last tenth of the devices."""
    n = max(1, len(completions) // 10)
    span = completions[n - 1] if first else completions[-1] - completions[-n - 1]
    return 1000 * span / n


def extrapolate(completions: list[float], count: int) -> float:
    """Seconds `count` devices would take, from t(k) = c + a·k + b·k² fitted to when the k-th device
    was done: a cost per device that grows with the devices before it, as a file rewritten whole does."""
    k = np.arange(1, len(completions) + 1, dtype=float)
    terms = np.column_stack([np.ones_like(k), k, k * k])
    (c, a, b), *_ = np.linalg.lstsq(terms, np.asarray(completions), rcond=None)
    return float(c + a * count + b * count * count)


def warm_up(base: str, api_key: str, *, clients: int, progress: Progress) -> None:
    """Devices of each kind from every client, untimed: the API's first requests open its pools, load
    the fleet CA and connect its broker admin."""
    bodies: list[dict[str, Any]] = []
    for n in range(clients):
        device_id = f"warm-cert-{n}"
        csr = signing_request(ec.generate_private_key(ec.SECP256R1()), device_id)
        bodies += [
            {"id": device_id, "cohort_id": COHORT, "csr": csr},
            {"id": f"warm-pw-{n}", "cohort_id": COHORT},
        ]
    task = progress.add_task("warm-up", total=len(bodies))
    done = provision(base, api_key, bodies, clients=clients, progress=progress, task=task)
    if done["failures"]:
        raise RuntimeError(f"the API refused the warm-up: {done['failure_examples']}")


def admitted(lab: CertificateLab, phase: dict[str, Any], keys: dict[str, ec.EllipticCurvePrivateKey]) -> int:
    """How many of the devices whose `keys` are given connect with their issued certificate."""
    connected = 0
    for device_id, key in keys.items():
        directory = lab.workdir / "devices" / device_id
        directory.mkdir(parents=True)
        (directory / "cert.pem").write_text(phase["responses"][device_id]["certificate"])
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (directory / "identity.key").write_bytes(pem)
        target = lab.devices.with_certificate(directory / "cert.pem", directory / "identity.key")
        try:
            with BrokerConnection(target, ClientOptions(device_id), timeout=10) as connection:
                connected += connection.connected
        except BrokerConnectError:
            continue
    return connected


def phase_report(phase: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    figures = {k: v for k, v in phase.items() if k not in ("responses", "completions")}
    return figures | {"broker_before": before, "broker_after": after} | state_change(before, after)


def run(
    admin_url: str, *, certificates: int, passwords: int, clients: int, workers: int = 1
) -> dict[str, Any]:
    """Provision `certificates` then `passwords` devices through the API; the report."""
    cert_ids = [f"cert-{n:05d}" for n in range(certificates)]
    password_ids = [f"pw-{n:05d}" for n in range(passwords)]
    with certificate_lab(admin_url) as lab, Progress(transient=True) as progress:
        bodies, keys, key_seconds = make_requests(cert_ids, progress, keep=[cert_ids[0], cert_ids[-1]])
        api_key = seed(lab)
        with api_server(lab.database_url, workers, api_env(lab)) as base:
            warm_up(base, api_key, clients=clients, progress=progress)
            before = broker_state(lab.broker)
            task = progress.add_task(f"{certificates:,} certificate devices", total=certificates)
            cert = provision(base, api_key, bodies, clients=clients, progress=progress, task=task)
            after_cert = broker_state(lab.broker)
            task = progress.add_task(f"{passwords:,} password devices", total=passwords)
            plain = [{"id": device_id, "cohort_id": COHORT} for device_id in password_ids]
            password = provision(base, api_key, plain, clients=clients, progress=progress, task=task)
            after_password = broker_state(lab.broker)
        connected = admitted(lab, cert, keys)
    certificate = phase_report(cert, before, after_cert)
    certificate["extrapolated_2000_s"] = REFERENCE["password_devices"] / cert["per_s"]
    password_report = phase_report(password, after_cert, after_password)
    password_report["extrapolated_2000_s"] = extrapolate(password["completions"], 2000)
    password_report["extrapolated_same_count_s"] = extrapolate(password["completions"], certificates)
    ok = (
        cert["failures"] == 0
        and password["failures"] == 0
        and certificate["state_files_unchanged"]
        and certificate["rss_held"]
        and connected == len(keys)
    )
    return {
        "benchmark": "provision_certificates",
        "clients": clients,
        "api_workers": workers,
        "key_generation": {
            "devices": certificates,
            "seconds": key_seconds,
            "ms_each": 1000 * key_seconds / max(1, certificates),
        },
        "certificate": certificate,
        "password": password_report,
        "admitted": {"checked": len(keys), "connected": connected},
        "reference": REFERENCE,
        "ok": ok,
        **harness.machine_keys(),
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    cert, pw, keys = report["certificate"], report["password"], report["key_generation"]

    def moved(before: dict[str, Any], after: dict[str, Any], name: str) -> str:
        was, now = (before["files"][name] or {}).get("bytes", 0), (after["files"][name] or {}).get("bytes", 0)
        return f"{was:,} → {now:,} ({now - was:+,})"

    def broker(phase: dict[str, Any]) -> list[str]:
        b, a = phase["broker_before"], phase["broker_after"]
        return [f"{b['rss_mb']:.1f} → {a['rss_mb']:.1f} ({phase['rss_delta_mb']:+.2f})"] + [
            moved(b, a, name) for name in STATE_FILES
        ]

    def unchanged(phase: dict[str, Any]) -> str:
        if phase["state_files_unchanged"] and phase["rss_held"]:
            return "yes"
        state = sum(phase["state_bytes_delta"].values()) / phase["devices"]
        rss = 1024 * phase["rss_delta_mb"] / phase["devices"]
        return f"no: {state:,.0f} B of files, {rss:.1f} KiB RSS a device"

    title = (
        f"Provisioning through the API on one mosquitto in certificate mode: {cert['devices']:,} certificate "
        f"and {pw['devices']:,} password devices, {report['clients']} clients ({report['cpus']} CPUs)"
    )
    table = harness.table(title, ("figure", "certificate", "password"), left=1)
    reference = report["reference"]
    rows = [
        ("devices", f"{cert['devices']:,}", f"{pw['devices']:,}"),
        ("keys + CSRs made beforehand", f"{keys['seconds']:.2f} s ({keys['ms_each']:.2f} ms each)", "—"),
        ("provisioning time", f"{cert['seconds']:.1f} s", f"{pw['seconds']:.1f} s"),
        ("devices / s", f"{cert['per_s']:.0f}", f"{pw['per_s']:.1f}"),
        ("request p50 / p99", *(f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f} ms" for p in (cert, pw))),
        (
            "ms per device, first / last tenth",
            *(
                f"{p['ms_per_device_first_tenth']:.1f} / {p['ms_per_device_last_tenth']:.1f}"
                for p in (cert, pw)
            ),
        ),
        ("failures", f"{cert['failures']}", f"{pw['failures']}"),
        *zip(
            ("broker RSS MB", *(f"{name} bytes" for name in STATE_FILES)),
            broker(cert),
            broker(pw),
            strict=True,
        ),
        ("broker unchanged", unchanged(cert), unchanged(pw)),
        (
            f"{reference['password_devices']:,} devices would take",
            f"{cert['extrapolated_2000_s']:.1f} s",
            f"{pw['extrapolated_2000_s']:.0f} s",
        ),
        (
            f"{cert['devices']:,} devices would take",
            f"{cert['seconds']:.1f} s",
            f"{pw['extrapolated_same_count_s']:.0f} s",
        ),
        (
            "certificate devices the broker admits",
            f"{report['admitted']['connected']} / {report['admitted']['checked']}",
            "",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        f"Issue 18's reference: {reference['seconds']:.0f} s for {reference['password_devices']:,} password "
        f"devices ({reference['source']}). Password figures beyond {pw['devices']:,} devices are "
        "extrapolated from t(k) = c + a·k + b·k² fitted to this run."
    )


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "provision_certificates")
    parser.add_argument("--devices", type=int, default=10_000, help="certificate devices")
    parser.add_argument("--password-devices", type=int, default=500, help="password devices, for comparison")
    parser.add_argument("--clients", type=int, default=4, help="concurrent API clients")
    parser.add_argument("--workers", type=int, default=1, help="API worker processes")
    parser.add_argument("--quick", action="store_true", help="200 certificate and 50 password devices")
    args = parser.parse_args(argv)
    certificates, passwords = (200, 50) if args.quick else (args.devices, args.password_devices)
    admin_url = harness.postgres_url()
    console = Console()
    report = run(
        admin_url, certificates=certificates, passwords=passwords, clients=args.clients, workers=args.workers
    )
    report["quick"] = args.quick
    print_table(report, console)
    harness.write_results(report, args.out, console)
    if not report["ok"]:
        raise SystemExit("provisioning benchmark: a check failed (see the table)")


if __name__ == "__main__":
    main()
