"""The services of `diredi up` as child processes (cloud/localsystem.py): each runs `diredi <args>`
with its output appended to a log file of its own, and ends when the thread that started it does
(Linux: PR_SET_PDEATHSIG), so a killed parent leaves nothing running. With the helpers that watch them:
their environment, a port's owner, an HTTP probe.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess  # noqa: S404 (our own CLI, fixed argument lists)
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError

from pydantic import SecretStr

from cloud.settings import Settings

TAIL_LINES = 20

# A child runs `diredi <args>` (through its entry point: its errors are one line too); it asks the kernel
# for SIGTERM when the thread that started it ends, and exits if that already happened (between fork
# and prctl). No preexec_fn: the parent has threads.
_CHILD = """\
import os, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform == "linux":
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(0)
from cloud.cli.main import main
main()
"""


@dataclass
class Child:
    """One part of the system as a child process: `diredi <args>`, its output appended to `log_path`."""

    name: str
    args: list[str]
    log_path: Path
    ready: Callable[[Child], bool] = field(repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_offset: int = 0  # where this run's output starts in the log

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.log_path.open("ab") as output:
            os.chmod(self.log_path, 0o600)  # logs name devices and accounts
            self.log_offset = output.tell()
            self.process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-c", _CHILD, str(os.getpid()), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C at the terminal reaches the parent only; it stops us
            )

    def output(self) -> str:
        """What this run of the child wrote so far."""
        try:
            with self.log_path.open("rb") as file:
                file.seek(self.log_offset)
                return file.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.output().splitlines()[-lines:]) or "(nothing logged)"


def child_environment(settings: Settings, **overrides: str) -> dict[str, str]:
    """This process's environment with every `DIREDI_*` setting replaced by `settings`' values (so a
    child reads exactly these settings, whatever its `.env` says) and then by `overrides` (field names)."""
    names = {f"DIREDI_{name.upper()}": name for name in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in names}
    for key, name in names.items():
        value: Any = overrides.get(name, getattr(settings, name))
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        env[key] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails now (someone listens there)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def http_ok(url: str, timeout: float = 1.0) -> str | None:
    """The body of a 200 answer from `url`, or None (no answer, another status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 (http URLs we build)
            return answer.read().decode(errors="replace") if answer.status == 200 else None
    except (URLError, OSError, ValueError):
        return None


# Where free_ports looks first: below the kernel's ephemeral range, which every outgoing connection
# draws its local port from, so a port chosen there cannot be taken by one before its server binds it.
PORTS_BELOW_EPHEMERAL = (20_000, 32_768)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on now (held open together, so they differ): for the parts of a
    system started on free ports (the demo's), and for tests and benchmarks. Drawn from below the
    ephemeral range where the kernel says what it is, else the kernel's choice."""
    sockets: list[socket.socket] = []
    try:
        for port in _candidate_ports(count):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            if len(sockets) == count:
                break
        while len(sockets) < count:  # no range known, or every candidate taken
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _candidate_ports(count: int) -> list[int]:
    """Random ports below the ephemeral range, a few per port wanted; none when the range is unknown."""
    try:
        ephemeral_low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    low, high = PORTS_BELOW_EPHEMERAL[0], min(PORTS_BELOW_EPHEMERAL[1], ephemeral_low)
    if high - low < 8 * count:
        return []
    return random.SystemRandom().sample(range(low, high), 8 * count)
