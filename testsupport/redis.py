"""A redis-server of one's own (Celery's broker in production), for the tests and the benchmarks, as
`scratch_database` is a PostgreSQL database of one's own: loopback only, a free port, no persistence,
its files in a directory of the caller's.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from cloud.children import free_ports
from cloud.exceptions import CloudError

START_TIMEOUT = 10.0


class RedisUnavailable(CloudError):
    """No redis-server binary on this machine."""


def redis_binary() -> str:
    """The redis-server binary (also where Debian puts it outside root's PATH); raises RedisUnavailable."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/bin")
    if binary is None:
        raise RedisUnavailable("no redis-server here: run scripts/services.sh redis (make test does)")
    return binary


@contextmanager
def scratch_redis(workdir: Path) -> Iterator[str]:
    """A redis-server on 127.0.0.1 and a free port, its log in `workdir`; yields `redis://...:PORT/0`
    once it answers, and stops it on the way out."""
    binary = redis_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    log_path = workdir / "redis.log"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--logfile", str(log_path)]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # noqa: S603
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
    while not _answers(url):
        if process.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise CloudError(f"redis-server exited with code {process.returncode}:\n{log[-2000:]}")
        if time.monotonic() > deadline:
            raise CloudError(f"redis-server did not answer on {url} within {START_TIMEOUT:g} s")
        time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=0.5) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False
