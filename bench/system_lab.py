"""What the pipeline benchmarks share: the whole system (`LocalSystem`:
`diredi ingest`, `diredi worker --beat` and `diredi api` as child processes) configured on a lab's
mosquitto and PostgreSQL registry (bench/mqtt_lab.py) and a redis-server of its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
from pydantic import SecretStr

from bench.mqtt_lab import Lab, lab
from cloud.children import free_ports
from cloud.localsystem import LocalSystem
from cloud.settings import Settings
from testsupport.redis import scratch_redis


@contextmanager
def lab_and_redis(admin_database_url: str) -> Iterator[tuple[Lab, str]]:
    """A lab (bench/mqtt_lab.py) and a redis-server in its directory, what `local_system` runs on;
    yields the lab and redis's URL."""
    with lab(admin_database_url) as bench_lab, scratch_redis(bench_lab.workdir / "redis") as redis_url:
        yield bench_lab, redis_url


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
