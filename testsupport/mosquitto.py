"""mosquitto as a child process of a test or a benchmark, on the production configuration
(`broker.mosquitto.render_config`): started, stopped, killed and started again on the same state."""

from __future__ import annotations

import logging
import re
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from broker.exceptions import MosquittoError
from broker.mosquitto import CONFIG_NAME, LOG_NAME, find_binary

log = logging.getLogger(__name__)

_RUNNING = re.compile(rb"mosquitto version \S+ running")
OPEN_FILES = 65_536  # the soft NOFILE limit asked for mosquitto: one descriptor per connection


def _raise_open_files(pid: int) -> None:
    """Let mosquitto hold thousands of connections (the usual soft limit is 1,024 descriptors).

    Set on the running child with prlimit(2) rather than in a `preexec_fn`, which is unsafe in a
    process with threads (paho's, the API's); mosquitto is still starting up when this runs."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= OPEN_FILES:
        return
    if hard == unlimited or hard >= OPEN_FILES:
        attempts = [(OPEN_FILES, hard)]
    else:  # raising the hard limit needs CAP_SYS_RESOURCE; else go as far as the hard limit allows
        attempts = [(OPEN_FILES, OPEN_FILES), (hard, hard)]
    for limits in attempts:
        if limits[0] <= soft:
            return
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
            return
        except (OSError, ValueError):
            continue
    log.warning("could not raise mosquitto's open-file limit from %d (hard limit %d)", soft, hard)


class MosquittoProcess:
    """mosquitto, as a child process, on the configuration rendered in `state_dir`. Its output goes to
    `<state_dir>/mosquitto.log`. It can be killed and started again on the same port and state."""

    def __init__(self, state_dir: Path, *, port: int, host: str = "127.0.0.1") -> None:
        self.state_dir = state_dir.resolve()
        self.config = self.state_dir / CONFIG_NAME
        self.log_path = self.state_dir / LOG_NAME
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self._process.pid if self.running and self._process else None

    def start(self, *, timeout: float = 10.0) -> None:
        """Start mosquitto and return once it runs and its plain listener accepts connections."""
        if self.running:
            return
        if not self.config.is_file():
            raise MosquittoError(f"no configuration at {self.config} (render_config makes it)")
        binary = find_binary("mosquitto")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as output:
            self._process = subprocess.Popen(  # noqa: S603
                [str(binary), "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the parent does not reach the broker
            )
        _raise_open_files(self._process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise MosquittoError(
                    f"mosquitto exited with code {self._process.returncode}:\n{self.log_tail()}"
                )
            # "running" is logged once every listener is open: a port that answers before it could
            # be another process's.
            if self._logged_running(offset) and self._accepts():
                return
            time.sleep(0.02)
        self.kill()
        raise MosquittoError(
            f"mosquitto did not start on {self.host}:{self.port} in {timeout:g} s:\n{self.log_tail()}"
        )

    def _logged_running(self, offset: int) -> bool:
        with self.log_path.open("rb") as log_file:
            log_file.seek(offset)
            return _RUNNING.search(log_file.read()) is not None

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean shutdown (what is not yet saved is lost)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM, and wait for mosquitto to save its state and exit (SIGKILL after `timeout`)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines mosquitto wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> MosquittoProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
