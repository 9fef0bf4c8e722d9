"""What the MQTT benchmarks share: a mosquitto with the production configuration in a scratch
directory (password devices, or certificate devices of a fleet CA), a migrated scratch PostgreSQL
registry with provisioned devices, ingest processes, and CPU/memory readings of the processes under
test."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from bench import harness
from broker.acl import provision_commands
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.mosquitto import DYNSEC_NAME, bootstrap, init_dynsec, render_config
from cloud.children import free_ports
from cloud.fleet_ca import FleetCA
from cloud.registry import migrate
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.devices import Certificate, create_cohort, provision_certificate_device, provision_device
from cloud.registry.tables import Telemetry
from device_firmware_py.identity import signing_request
from testsupport.mosquitto import MosquittoProcess
from testsupport.postgres import scratch_database

CERTS_SCRIPT = harness.ROOT / "broker" / "certs.sh"
CLOUD_USER = "diredi-cloud"
DeviceIdentity = Literal["password", "certificate"]


@dataclass
class Broker:
    """A running mosquitto and the accounts a benchmark reaches it with."""

    process: MosquittoProcess
    target: BrokerTarget  # plain, no credentials (certificate mode: the services' listener, TLS)
    tls_target: BrokerTarget  # TLS verified against the lab CA, no credentials: the devices' listener
    admin: BrokerTarget
    cloud: BrokerTarget
    fleet_ca: FleetCA | None = None  # certificate mode: the CA whose certificates the devices show


@contextmanager
def running_broker(workdir: Path) -> Iterator[Broker]:
    """mosquitto with the production configuration and lab certificates (in `workdir`) on free
    loopback ports, its dynamic security bootstrapped with an admin and the cloud's account."""
    certs = workdir / "certs"
    subprocess.run([str(CERTS_SCRIPT), str(certs)], check=True, capture_output=True, timeout=60)  # noqa: S603
    port, tls_port = free_ports(2)
    state = workdir / "broker"
    render_config(state, port=port, tls_port=tls_port, cert_dir=certs, tls_bind="127.0.0.1")
    admin_password = secrets.token_urlsafe(24)
    init_dynsec(state, admin_user="admin", admin_password=admin_password)
    with MosquittoProcess(state, port=port) as process:
        target = BrokerTarget(host="127.0.0.1", port=port)
        tls_target = BrokerTarget(host="127.0.0.1", port=tls_port, tls=True, ca_file=certs / "ca.crt")
        admin = target.with_credentials("admin", admin_password)
        cloud = target.with_credentials(CLOUD_USER, secrets.token_urlsafe(24))
        bootstrap(admin, cloud_user=CLOUD_USER, cloud_password=str(cloud.password))
        yield Broker(process, target, tls_target, admin, cloud)


@contextmanager
def running_certificate_broker(workdir: Path) -> Iterator[Broker]:
    """mosquitto in certificate mode (docs/certificate-identity.md) on free loopback ports: devices on
    the mutual-TLS listener (`tls_target`, certificates of the fleet CA made in `workdir`, an empty
    CRL), the admin and the cloud's account on the services' listener (`target`, TLS)."""
    certs = workdir / "certs"
    subprocess.run([str(CERTS_SCRIPT), str(certs)], check=True, capture_output=True, timeout=60)  # noqa: S603
    fleet_ca = FleetCA.open(workdir / "fleet-ca")
    port, tls_port = free_ports(2)
    state = workdir / "broker"
    render_config(
        state,
        port=port,
        tls_port=tls_port,
        cert_dir=certs,
        tls_bind="127.0.0.1",
        devices="certificate",
        fleet_ca=fleet_ca.directory / "ca.pem",
        crl_file=fleet_ca.write_crl([]),
    )
    admin_password = secrets.token_urlsafe(24)
    init_dynsec(state, admin_user="admin", admin_password=admin_password)
    with MosquittoProcess(state, port=port) as process:
        target = BrokerTarget(host="127.0.0.1", port=port, tls=True, ca_file=certs / "ca.crt")
        tls_target = BrokerTarget(host="127.0.0.1", port=tls_port, tls=True, ca_file=certs / "ca.crt")
        admin = target.with_credentials("admin", admin_password)
        cloud = target.with_credentials(CLOUD_USER, secrets.token_urlsafe(24))
        bootstrap(admin, cloud_user=CLOUD_USER, cloud_password=str(cloud.password))
        yield Broker(process, target, tls_target, admin, cloud, fleet_ca)


@dataclass
class Lab:
    """A running broker and registry for one benchmark."""

    broker: MosquittoProcess
    target: BrokerTarget  # no credentials (certificate mode: the services' listener)
    admin: BrokerTarget
    cloud: BrokerTarget
    database_url: str
    sessions: sessionmaker[Session]
    workdir: Path
    tls_target: BrokerTarget | None = None  # the devices' TLS listener (certificate mode: mutual TLS)
    fleet_ca: FleetCA | None = None  # certificate mode only


@contextmanager
def lab(admin_database_url: str, *, devices: DeviceIdentity = "password") -> Iterator[Lab]:
    """mosquitto (`running_broker`, or `running_certificate_broker` for certificate devices) and a
    migrated scratch registry."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diredi-bench-")))
        starts = running_certificate_broker if devices == "certificate" else running_broker
        broker = stack.enter_context(starts(workdir))
        url = stack.enter_context(scratch_database(admin_database_url, prefix="diredi_bench"))
        engine = make_engine(url)
        migrate.upgrade(engine)
        stack.callback(engine.dispose)
        yield Lab(
            broker.process,
            broker.target,
            broker.admin,
            broker.cloud,
            url,
            session_factory(engine),
            workdir,
            broker.tls_target,
            broker.fleet_ca,
        )


def provision(
    lab: Lab, device_ids: Sequence[str], *, cohort: str = "bench", broker_stopped: bool = False
) -> dict[str, str]:
    """Provision devices in the registry and the broker; their secrets by id.

    `broker_stopped`: write the devices' clients and roles (the same ones, from the same commands) into
    the broker's dynamic-security file while mosquitto is stopped, then start it again. mosquitto 2.0
    rewrites that whole file after every createClient and createRole, so through the control topic
    provisioning n devices takes time in n² (2,000 devices: over 2 minutes, the broker stalled for
    ~70 ms a command by the end); written directly it takes a second."""
    secrets_by_id: dict[str, str] = {}
    with transaction(lab.sessions) as session:
        create_cohort(session, cohort_id=cohort)
        for device_id in device_ids:
            _, secrets_by_id[device_id] = provision_device(session, device_id=device_id, cohort_id=cohort)
    if broker_stopped:
        lab.broker.stop()
        write_dynsec(lab.broker.state_dir / DYNSEC_NAME, secrets_by_id)
        lab.broker.start()
        return secrets_by_id
    with DynsecAdmin(lab.admin, timeout=60) as admin:
        ids = list(device_ids)
        for start in range(0, len(ids), 100):
            admin.execute(
                [c for d in ids[start : start + 100] for c in provision_commands(d, secrets_by_id[d])]
            )
    return secrets_by_id


def write_dynsec(path: Path, secrets_by_id: dict[str, str]) -> None:
    """Add the role and the client `provision_commands` makes for each device to a dynamic-security
    file (mosquitto not running), hashed as mosquitto hashes: PBKDF2-SHA512, a 12-byte salt, and the
    iteration count mosquitto gave the clients already there."""
    document = json.loads(path.read_text())
    iterations = max((int(c.get("iterations", 0)) for c in document["clients"]), default=0) or 101
    for device_id, secret in secrets_by_id.items():
        role, client = provision_commands(device_id, secret)
        document["roles"].append({"rolename": role["rolename"], "acls": role["acls"]})
        salt = secrets.token_bytes(12)
        digest = hashlib.pbkdf2_hmac("sha512", client["password"].encode(), salt, iterations)
        document["clients"].append(
            {
                "username": client["username"],
                "clientid": client["clientid"],
                "roles": client["roles"],
                "password": base64.b64encode(digest).decode(),
                "salt": base64.b64encode(salt).decode(),
                "iterations": iterations,
            }
        )
    path.write_text(json.dumps(document, indent="\t"))


@dataclass
class CertifiedDevices:
    """Certificate devices made for a benchmark: each one's (certificate, key) files, and the seconds
    each step took for all of them."""

    files: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # keys, certificates, files, registry


def provision_certificates(lab: Lab, device_ids: Sequence[str], *, cohort: str = "bench") -> CertifiedDevices:
    """Certificate devices as a fleet makes them: each an EC P-256 key of its own and a CSR
    (`device_firmware_py.identity.signing_request`), certified by the lab's fleet CA, registered in
    the registry by its certificate. The broker is not told: its pattern ACL admits any CN the CA
    certified. Keys and certificates are written to `<workdir>/devices/`."""
    if lab.fleet_ca is None:
        raise ValueError("certificate devices need a lab made by lab(..., devices='certificate')")
    made = CertifiedDevices()
    started = time.monotonic()
    keys = {device_id: ec.generate_private_key(ec.SECP256R1()) for device_id in device_ids}
    made.seconds["keys"] = time.monotonic() - started
    started = time.monotonic()
    issued = {d: lab.fleet_ca.issue(signing_request(key, d), d) for d, key in keys.items()}
    made.seconds["certificates"] = time.monotonic() - started
    started = time.monotonic()
    directory = lab.workdir / "devices"
    directory.mkdir(mode=0o700, exist_ok=True)
    for device_id, key in keys.items():
        certificate, key_file = directory / f"{device_id}.crt", directory / f"{device_id}.key"
        certificate.write_text(issued[device_id].pem)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with os.fdopen(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as sink:
            sink.write(pem)
        made.files[device_id] = (certificate, key_file)
    made.seconds["files"] = time.monotonic() - started
    started = time.monotonic()
    with transaction(lab.sessions) as session:
        create_cohort(session, cohort_id=cohort)
        for device_id, made_for in issued.items():
            provision_certificate_device(
                session,
                device_id=device_id,
                cohort_id=cohort,
                certificate=Certificate(made_for.serial, made_for.sha256, made_for.not_after),
            )
    made.seconds["registry"] = time.monotonic() - started
    return made


def raise_open_files(needed: int) -> int:
    """Raise this process's soft open-file limit to at least `needed` descriptors (up to the hard
    limit); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def stored_telemetry(lab: Lab) -> int:
    with lab.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Telemetry)) or 0)


def last_telemetry_id(lab: Lab) -> int:
    """The highest telemetry id committed: one index probe, where counting rows scans the table (twenty
    counts a second of a growing table took a tenth of the machine from the ingest under test). Rows
    of a rolled-back batch took ids too, and transactions commit out of order, so it says when
    counting is worth it, never how many rows were stored."""
    with lab.sessions() as session:
        return int(session.scalar(select(func.max(Telemetry.id))) or 0)


@contextmanager
def ingests(lab: Lab, count: int, *, batch_size: int = 1000) -> Iterator[list[psutil.Process]]:
    """`count` `diredi ingest` processes on one shared subscription; yields them once all subscribed."""
    env = {
        **os.environ,
        "DIREDI_MQTT_URL": lab.cloud.url(),
        "DIREDI_DATABASE_URL": lab.database_url,
        "DIREDI_DATA_DIR": str(lab.workdir / "data"),
        "DIREDI_INGEST_BATCH_SIZE": str(batch_size),
        # A group of their own: the persistent sessions of an earlier run's ingests would otherwise still
        # hold their shares of the group's messages, queued until they come back.
        "DIREDI_INGEST_GROUP": f"bench-{count}-{secrets.token_hex(3)}",
    }
    if lab.cloud.ca_file is not None:  # certificate mode: the services' listener is TLS
        env["DIREDI_MQTT_CA_FILE"] = str(lab.cloud.ca_file)
    binary = str(Path(sys.executable).parent / "diredi")
    processes: list[subprocess.Popen[bytes]] = []
    logs = [lab.workdir / f"ingest-{count}-{n}.log" for n in range(count)]
    try:
        for n, log in enumerate(logs):
            command = [binary, "ingest", "--name", f"bench-{count}-{n}", "--metrics-port", "0"]
            with log.open("wb") as sink:
                processes.append(subprocess.Popen(command, env=env, stderr=sink, stdout=sink))  # noqa: S603
        deadline = time.monotonic() + 60
        while not all("subscribed" in log.read_text(errors="replace") for log in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                tails = "\n".join(log.read_text(errors="replace")[-1500:] for log in logs)
                raise RuntimeError(f"the ingests did not subscribe:\n{tails}")
            time.sleep(0.1)
        yield [psutil.Process(p.pid) for p in processes]
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@dataclass
class Usage:
    """CPU (percent of one core, averaged) and peak RSS of some processes over a measured span."""

    cpu_percent: float
    rss_mb: float
    cpu_s: float = 0.0  # CPU seconds (user + system) over the span


class UsageMeter:
    """Reads CPU time at start and end, and samples RSS, for a set of processes."""

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        self.processes = list(processes)
        self._cpu0 = [self._cpu(p) for p in self.processes]
        self._t0 = time.monotonic()
        self.rss_peak = 0.0

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def sample(self) -> None:
        rss = sum(p.memory_info().rss for p in self.processes if p.is_running())
        self.rss_peak = max(self.rss_peak, rss / 2**20)

    def done(self) -> Usage:
        self.sample()
        elapsed = time.monotonic() - self._t0
        used = sum(self._cpu(p) - c0 for p, c0 in zip(self.processes, self._cpu0, strict=True))
        return Usage(cpu_percent=100 * used / elapsed if elapsed else 0.0, rss_mb=self.rss_peak, cpu_s=used)


def database_backends(lab: Lab) -> list[psutil.Process]:
    """The PostgreSQL server processes serving the lab's database now (other than this query's)."""
    database = lab.database_url.rsplit("/", 1)[1].split("?")[0]
    with lab.sessions() as session:
        pids = session.scalars(
            text("SELECT pid FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"),
            {"db": database},
        ).all()
    return [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]


class CpuSplit:
    """CPU time by part over a measured span, per message: each part is a set of processes, and
    `rest` is what the whole machine spent besides (publishers, the benchmark itself, the kernel).
    On a saturated machine (`busy_percent` near 100) the rate is the cores over the total."""

    def __init__(self, parts: dict[str, Sequence[psutil.Process]]) -> None:
        self.meters = {name: UsageMeter(processes) for name, processes in parts.items()}
        self._machine0 = self._busy()
        self._t0 = time.monotonic()

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()  # Linux's fields: guest time is counted in user already
        return float(times.user + times.nice + times.system + times.irq + times.softirq)

    def done(self, messages: int, **exited: float) -> dict[str, float]:
        """Microseconds of one core per message for each part, `rest` and `total`, and `busy_percent`:
        the share of all cores that was busy. `exited`: CPU seconds of parts whose processes have
        ended (read from their exit status), by name."""
        elapsed = time.monotonic() - self._t0
        machine = self._busy() - self._machine0
        split = {name: meter.done().cpu_percent * elapsed / 100 for name, meter in self.meters.items()}
        split.update(exited)
        split["rest"] = max(machine - sum(split.values()), 0.0)
        split["total"] = machine
        per_message = {name: 1e6 * seconds / messages for name, seconds in split.items()}
        cores = psutil.cpu_count() or 1
        per_message["busy_percent"] = 100 * machine / (elapsed * cores) if elapsed else 0.0
        return per_message
