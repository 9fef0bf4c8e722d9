"""What the pipeline benchmarks share: a redis-server of their own, and the whole system (`LocalSystem`:
`diredi ingest`, `diredi worker --beat` and `diredi api` as child processes) configured on a lab's
mosquitto and PostgreSQL registry (bench/mqtt_lab.py)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis
from pydantic import SecretStr

from bench.mqtt_lab import Lab
from broker.mosquitto import free_ports
from cloud.localsystem import LocalSystem
from cloud.settings import Settings

REDIS_START_TIMEOUT = 10.0


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A redis-server on 127.0.0.1 and a free port (no persistence), its files in `workdir`; yields
    `redis://127.0.0.1:PORT/0`."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/bin")
    if binary is None:
        raise SystemExit("no redis-server here: run scripts/services.sh redis")
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    log_path = workdir / "redis.log"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--logfile", str(log_path)]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # noqa: S603
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log = log_path.read_text(errors="replace") if log_path.exists() else ""
                raise RuntimeError(f"redis-server did not start:\n{log[-2000:]}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=0.5) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


@contextmanager
def local_system(lab: Lab, redis_url: str, **settings: Any) -> Iterator[LocalSystem]:
    """The system on the lab's mosquitto and registry and on `redis_url`, each service's metrics on a
    port of its own; `settings` are further `Settings` fields. Yields it once every part is ready."""
    api_port, ingest_metrics, worker_metrics = free_ports(3)
    configured = Settings(
        data_dir=lab.workdir / "data",
        mqtt_url=SecretStr(lab.cloud.url()),
        mqtt_admin_url=SecretStr(lab.admin.url()),
        database_url=lab.database_url,
        redis_url=redis_url,
        ingest_metrics_port=ingest_metrics,
        worker_metrics_port=worker_metrics,
        **settings,
    )
    with LocalSystem(configured, api_port=api_port, log_dir=lab.workdir / "logs") as system:
        yield system


def processes(system: LocalSystem, lab: Lab) -> dict[str, psutil.Process]:
    """The processes under test by name: each service with its children (the worker forks), mosquitto."""
    found = {"mosquitto": psutil.Process(lab.broker.pid or 0)}
    for name, child in system.children.items():
        found[name] = psutil.Process(child.pid or 0)
    return found


def tree_cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds (user + system) used so far by a process and its living children."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
