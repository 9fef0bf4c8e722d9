"""Pytest plugin: a redis-server of the test's own on a free loopback port (Celery's broker in production).

`running_redis(tmp_dir)` starts one (no persistence, loopback only) and yields its URL; `redis_url` is a
session fixture around it. Needs the redis-server binary (`scripts/services.sh redis`, which `make
test` runs); without it the test is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from broker.mosquitto import free_ports

START_TIMEOUT = 10.0


@contextmanager
def running_redis(tmp_dir: Path) -> Iterator[str]:
    """A redis-server on 127.0.0.1 and a free port, its files in `tmp_dir`; yields `redis://...:PORT/0`."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/bin")
    if binary is None:
        pytest.skip("no redis-server here: run scripts/services.sh redis (make test does)")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    log_path = tmp_dir / "redis.log"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(tmp_dir), "--logfile", str(log_path)]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_answers(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_answers(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise RuntimeError(f"redis-server exited with code {process.returncode}:\n{log[-2000:]}")
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=0.5) as client:
                if client.ping():
                    return
        except redis.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer on {url} within {START_TIMEOUT:g} s")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the test session (tests that need an empty one use `running_redis`)."""
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url
