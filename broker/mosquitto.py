"""Run mosquitto with the production configuration: render it, initialise dynamic security, start and
stop the process, and bootstrap the default ACL and the cloud's account (docs/broker.md)."""

import logging
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess  # noqa: S404 (mosquitto and mosquitto_ctrl, fixed argument lists)
import time
from pathlib import Path
from types import TracebackType

from broker.acl import (
    CLOUD_ROLE,
    Command,
    cloud_account_commands,
    default_access_commands,
    service_account_commands,
)
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.exceptions import BrokerAdminError, MosquittoError

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("mosquitto.conf")
CONFIG_NAME = "mosquitto.conf"
DYNSEC_NAME = "dynamic-security.json"
LOG_NAME = "mosquitto.log"
PLUGIN_NAME = "mosquitto_dynamic_security.so"
PLUGIN_DIRS = (  # Debian/Ubuntu (multiarch), then source and other distributions' installs
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/usr/lib/aarch64-linux-gnu"),
    Path("/usr/lib/arm-linux-gnueabihf"),
    Path("/usr/lib"),
    Path("/usr/local/lib"),
    Path("/usr/lib64"),
)
_RUNNING = re.compile(rb"mosquitto version \S+ running")
OPEN_FILES = 65_536  # the soft NOFILE limit asked for mosquitto: one descriptor per connection


def find_binary(name: str) -> Path:
    """The path of `mosquitto` or `mosquitto_ctrl` (also looked for in /usr/sbin, often not on PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MosquittoError(f"{name} is not installed (scripts/services.sh mosquitto installs it)")
    return Path(found)


def find_plugin() -> Path:
    """The dynamic-security plugin of the installed mosquitto."""
    for directory in PLUGIN_DIRS:
        if (directory / PLUGIN_NAME).is_file():
            return directory / PLUGIN_NAME
    raise MosquittoError(f"{PLUGIN_NAME} not found in {', '.join(map(str, PLUGIN_DIRS))}")


def render_config(
    state_dir: Path,
    *,
    port: int = 1883,
    tls_port: int = 8883,
    cert_dir: Path,
    tls_bind: str | None = None,
    plugin: Path | None = None,
    user: str | None = None,
) -> Path:
    """Fill broker/mosquitto.conf in for one broker and write it to `<state_dir>/mosquitto.conf`.

    `tls_bind`: the TLS listener's address (default: every interface). `user`: whom mosquitto
    becomes when started as root (default: the user running this, so it can write `state_dir`).
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    values = {
        "STATE_DIR": str(state_dir),
        "PORT": str(port),
        "TLS_PORT": str(tls_port),
        "TLS_BIND": tls_bind or "",
        "CERT_DIR": str(cert_dir.resolve()),
        "PLUGIN": str(plugin or find_plugin()),
        "USER": user or pwd.getpwuid(os.getuid()).pw_name,
    }
    for name, value in values.items():
        if any(c.isspace() for c in value) or "@" in value:
            raise MosquittoError(f"{name} may not hold spaces or '@' in mosquitto.conf: {value!r}")
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    config = state_dir / CONFIG_NAME
    config.write_text("\n".join(line.rstrip() for line in text.splitlines()) + "\n")
    return config


def init_dynsec(state_dir: Path, *, admin_user: str, admin_password: str) -> Path:
    """Create the dynamic-security file with its admin account, unless it exists (then it is kept:
    it holds every device's credentials)."""
    path = state_dir / DYNSEC_NAME
    if path.exists():
        return path
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mosquitto_ctrl takes the password as an argument (else it prompts); it is visible to this
    # host's process list for the moment the command runs, never logged here.
    result = subprocess.run(  # noqa: S603
        [str(find_binary("mosquitto_ctrl")), "dynsec", "init", str(path), admin_user, admin_password],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0 or not path.exists():
        detail = (result.stderr or result.stdout).replace(admin_password, "***").strip()
        raise MosquittoError(f"mosquitto_ctrl dynsec init failed: {detail[-500:]}")
    path.chmod(0o600)
    return path


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


def free_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on now (held open together, so they differ): for a broker
    started by a test or a benchmark."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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

    def __enter__(self) -> "MosquittoProcess":
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def bootstrap(admin_target: BrokerTarget, *, cloud_user: str, cloud_password: str) -> None:
    """Deny by default and create the cloud's service account. Safe to run again: an existing role or
    account is kept, and the account is given its role and `cloud_password` (a way to rotate it)."""
    with DynsecAdmin(admin_target) as admin:
        admin.execute(default_access_commands())
        for command in cloud_account_commands(cloud_user, cloud_password):
            if _create(admin, command) or command["command"] != "createClient":
                continue
            account = {"username": cloud_user}
            admin.execute([{"command": "setClientPassword", **account, "password": cloud_password}])
            found = admin.execute([{"command": "getClient", **account}])[0]["data"]["client"]
            if CLOUD_ROLE not in {r.get("rolename") for r in found.get("roles", [])}:
                admin.execute(
                    [{"command": "addClientRole", **account, "rolename": CLOUD_ROLE, "priority": 0}]
                )


def ensure_service_account(admin_target: BrokerTarget, name: str, password: str) -> None:
    """Create a service's own account bound to client id `name` (broker.acl.service_account_commands),
    or give an existing one `password` and its role back. Safe to run again."""
    with DynsecAdmin(admin_target) as admin:
        for command in service_account_commands(name, password):
            if _create(admin, command) or command["command"] != "createClient":
                continue
            account = {"username": name}
            admin.execute([{"command": "setClientPassword", **account, "password": password}])
            found = admin.execute([{"command": "getClient", **account}])[0]["data"]["client"]
            if found.get("clientid") != name:
                raise BrokerAdminError(f"{name} exists but is not bound to client id {name}: delete it first")
            if CLOUD_ROLE not in {r.get("rolename") for r in found.get("roles", [])}:
                admin.execute(
                    [{"command": "addClientRole", **account, "rolename": CLOUD_ROLE, "priority": 0}]
                )


def _create(admin: DynsecAdmin, command: Command) -> bool:
    """Run one create command; False if what it creates exists already."""
    try:
        admin.execute([command])
    except BrokerAdminError as exc:
        if exc.failures and all("already exists" in f.error for f in exc.failures):
            return False
        raise
    return True
