"""Child processes for the front's tests (nginx on a rendered configuration, uvicorn serving the API or the
echo app) and HTTP over raw sockets from a chosen loopback address."""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from cloud.api.problems import MEDIA_TYPE, PROBLEM_TYPE
from cloud.children import free_ports
from cloud.front import FrontLimits, find_nginx, nginx_command, render_config
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
CERTS_SCRIPT = ROOT / "broker" / "certs.sh"
DIREDI = Path(sys.executable).with_name("diredi")
# For a test module that runs nginx: a local run without it skips (CI installs it: .ci/run runs
# scripts/services.sh nginx).
needs_nginx = pytest.mark.skipif(
    find_nginx() is None, reason="nginx is not installed: scripts/services.sh nginx (as root) installs it"
)
# Production's numbers, with timeouts short enough for a test to wait them out.
TEST_LIMITS = FrontLimits(header_timeout_s=4, body_timeout_s=3)
# uvicorn's descriptors, as in the review that found it starved by 1,100 half-open connections.
API_OPEN_FILES = 1024


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (at most the hard limit); the new soft
    limit. Children started afterwards (nginx) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class Server:
    """A child process that listens on loopback ports, its output in `log_path`."""

    def __init__(self, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ports: Sequence[int], *, timeout: float = 60.0) -> None:
        """Start it; return once its own process tree listens on every one of `ports`."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.log_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.started()
            wait_until(lambda: self._listening(set(ports)), timeout, lambda: f"not up:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def started(self) -> None:
        """Called right after the process is made (before it listens)."""

    def _listening(self, ports: set[int]) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, f"exited with {self.process.returncode}:\n{self.log_tail()}"
        try:
            tree = psutil.Process(self.process.pid)
            found = {
                c.laddr.port
                for p in [tree, *tree.children(recursive=True)]
                for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
        except psutil.Error:
            return False
        return ports <= found

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.process is not None
        return self.process.pid

    def stop(self, *, timeout: float = 20.0) -> None:
        """SIGTERM, SIGKILL after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines it wrote."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class NginxProcess(Server):
    """nginx on `<prefix>/nginx.conf` (render_config's), in the foreground; its stderr (the error log) in
    `<prefix>/logs/nginx.log`."""

    def __init__(self, config: Path) -> None:
        nginx = find_nginx()
        assert nginx is not None, "nginx is not installed (scripts/services.sh nginx)"
        super().__init__(nginx_command(config, nginx), log_path=config.parent / "logs" / "nginx.log")


class UvicornProcess(Server):
    """uvicorn (through `diredi api`, or a test app) on 127.0.0.1:`port`, its descriptors cut to
    API_OPEN_FILES."""

    def __init__(self, argv: Sequence[str], *, port: int, log_path: Path, env: dict[str, str]) -> None:
        super().__init__(argv, log_path=log_path, env=env)
        self.port = port

    def started(self) -> None:
        # Lowered on the running child (lowering a soft limit needs no privilege); it has not listened yet.
        _, hard = resource.prlimit(self.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (API_OPEN_FILES, hard))


def _environment() -> dict[str, str]:
    """This process's environment without the settings a test must not inherit: DIREDI_*, and uvicorn's
    FORWARDED_ALLOW_IPS (the tests rely on its default, trusting 127.0.0.1 and ::1 only)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DIREDI_") and k != "FORWARDED_ALLOW_IPS"}


def api_process(directory: Path, port: int, env: dict[str, str] | None = None) -> UvicornProcess:
    """`diredi api` on 127.0.0.1:`port`, on a migrated SQLite registry and a data directory in `directory`
    (`env`: more settings)."""
    from cloud.registry import migrate
    from cloud.registry.db import make_engine

    directory.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{directory / 'registry.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    env = (
        _environment()
        | {
            "DIREDI_DATABASE_URL": url,
            "DIREDI_DATA_DIR": str(directory / "data"),
        }
        | (env or {})
    )
    argv = [str(DIREDI), "api", "--host", "127.0.0.1", "--port", str(port)]
    return UvicornProcess(argv, port=port, log_path=directory / "api.log", env=env)


PORT_TAKEN = "address already in use"  # uvicorn's and nginx's words, lower-cased
PORT_ATTEMPTS = 3


def started_api(directory: Path, env: dict[str, str] | None = None) -> UvicornProcess:
    """`api_process` started on a free port. A port is free when chosen and may be taken before the
    server binds it (another worker's server, or any outgoing connection: they share the ephemeral
    range), so a bind that fails for that reason is tried again on another port."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        (port,) = free_ports(1)
        process = api_process(directory, port, env)
        try:
            process.start([port])
        except AssertionError as exc:
            if PORT_TAKEN not in str(exc).lower() or attempt == PORT_ATTEMPTS:
                raise
            continue
        return process
    raise AssertionError("unreachable")


def echo_process(directory: Path, port: int) -> UvicornProcess:
    """uvicorn serving tests/front/echo.py on 127.0.0.1:`port` (its default proxy-header trust)."""
    directory.mkdir(parents=True, exist_ok=True)
    app_dir = str(ROOT)
    argv = [sys.executable, "-m", "uvicorn", "tests.front.echo:app", "--app-dir", app_dir]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return UvicornProcess(argv, port=port, log_path=directory / "echo.log", env=_environment())


@dataclass
class Front:
    """A running front: where it listens, what it was rendered with, what it proxies to."""

    plain_port: int  # plain HTTP on 127.0.0.1
    tls_port: int  # TLS on 127.0.0.1, the lab certificate
    ca: Path  # the lab CA that signed it
    limits: FrontLimits
    upstream_port: int
    nginx: NginxProcess

    def tls(self) -> ssl.SSLContext:
        """A client context that verifies the front against the lab CA."""
        return ssl.create_default_context(cafile=str(self.ca))


@contextmanager
def running_front(
    prefix: Path,
    *,
    upstream_port: int,
    certs: Path,
    limits: FrontLimits = TEST_LIMITS,
    device_ca: Path | None = None,
    front_secret: str | None = None,
    claim_ca: Path | None = None,
) -> Iterator[Front]:
    """nginx rendered into `prefix` in front of 127.0.0.1:`upstream_port`, started, stopped afterwards
    (with `device_ca` and `front_secret`: asking clients for a device certificate). Ports taken before
    nginx binds them are chosen again (`started_api`)."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        tls_port, plain_port = free_ports(2)
        config = render_config(
            prefix,
            listen=f"127.0.0.1:{tls_port}",
            plain_listen=f"127.0.0.1:{plain_port}",
            upstream=f"127.0.0.1:{upstream_port}",
            cert=certs / "server.crt",
            key=certs / "server.key",
            user=None,
            limits=limits,
            device_ca=device_ca,
            front_secret=front_secret,
            claim_ca=claim_ca,
        )
        nginx = NginxProcess(config)
        try:
            nginx.start([tls_port, plain_port], timeout=20)
        except AssertionError as exc:
            if PORT_TAKEN not in str(exc).lower() or attempt == PORT_ATTEMPTS:
                raise
            continue
        break
    try:
        yield Front(plain_port, tls_port, certs / "ca.crt", limits, upstream_port, nginx)
    finally:
        nginx.stop()


@dataclass
class Answer:
    """An HTTP response as read off the socket."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def content_type(self) -> str:
        """The media type, without parameters."""
        return (self.headers.get("content-type") or "").split(";")[0].strip()

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def assert_problem(answer: Answer, status: int) -> dict[str, object]:
    """`answer` is a problem with `status`, in the API's shape (cloud/api/problems.py)."""
    assert answer.status == status, answer.body[:300]
    assert answer.content_type == MEDIA_TYPE
    body = answer.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert body["type"] == PROBLEM_TYPE + str(body["title"]).lower().replace(" ", "-")
    assert body["detail"]
    return dict(body)


def connect(port: int, *, source: str = "127.0.0.1", timeout: float = 30.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` from `source` (any 127/8 address: Linux routes them to lo)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def read_answer(sock: socket.socket | ssl.SSLSocket) -> Answer:
    """Read one response from `sock` (which keeps its own timeout)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return Answer(response.status, response.headers, body)


def exchange(
    port: int, raw: bytes, *, source: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> Answer:
    """Send `raw` bytes as one request and read the response. The server may answer and close before it has
    read everything (a 413): a failed send is ignored as long as the answer can be read."""
    sock: socket.socket | ssl.SSLSocket = connect(port, source=source)
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_answer(sock)
    finally:
        sock.close()


def get(
    port: int,
    path: str,
    *,
    source: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """A well-formed GET."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode(), source=source, tls=tls)


def peek(sock: socket.socket) -> bytes | None:
    """Without waiting or consuming: None while `sock` is open and nothing came, b"" once the peer closed
    (or reset) it without a word, else the first bytes the peer sent."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # with a timeout set, Python would wait for data even with MSG_DONTWAIT
    try:
        return sock.recv(4096, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        sock.settimeout(timeout)


def upstream_connections(port: int) -> int:
    """Established TCP connections to 127.0.0.1:`port` (from nginx, when `port` is its upstream's)."""
    return sum(
        1
        for c in psutil.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )
