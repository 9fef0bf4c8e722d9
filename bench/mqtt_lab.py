"""What the MQTT benchmarks share: a mosquitto with the production configuration in a scratch
directory, a migrated scratch PostgreSQL registry with provisioned devices, ingest processes, and
CPU/memory readings of the processes under test."""

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
from dataclasses import dataclass
from pathlib import Path

import psutil
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from bench import harness
from broker.acl import provision_commands
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.mosquitto import DYNSEC_NAME, bootstrap, init_dynsec, render_config
from cloud.children import free_ports
from cloud.registry import migrate
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.devices import create_cohort, provision_device
from cloud.registry.tables import Telemetry
from testsupport.mosquitto import MosquittoProcess
from testsupport.postgres import scratch_database

CERTS_SCRIPT = harness.ROOT / "broker" / "certs.sh"
CLOUD_USER = "diredi-cloud"


@dataclass
class Broker:
    """A running mosquitto and the accounts a benchmark reaches it with."""

    process: MosquittoProcess
    target: BrokerTarget  # plain, no credentials
    tls_target: BrokerTarget  # TLS verified against the lab CA, no credentials
    admin: BrokerTarget
    cloud: BrokerTarget


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


@dataclass
class Lab:
    """A running broker and registry for one benchmark."""

    broker: MosquittoProcess
    target: BrokerTarget  # no credentials
    admin: BrokerTarget
    cloud: BrokerTarget
    database_url: str
    sessions: sessionmaker[Session]
    workdir: Path


@contextmanager
def lab(admin_database_url: str) -> Iterator[Lab]:
    """mosquitto (`running_broker`) and a migrated scratch registry."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diredi-bench-")))
        broker = stack.enter_context(running_broker(workdir))
        url = stack.enter_context(scratch_database(admin_database_url, prefix="diredi_bench"))
        engine = make_engine(url)
        migrate.upgrade(engine)
        stack.callback(engine.dispose)
        yield Lab(
            broker.process, broker.target, broker.admin, broker.cloud, url, session_factory(engine), workdir
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
        return Usage(cpu_percent=100 * used / elapsed if elapsed else 0.0, rss_mb=self.rss_peak)


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
