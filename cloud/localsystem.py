"""The whole system on one machine (`diredi up`, the demo, end-to-end tests): registry, broker, ingest,
worker and API, each service a child process with the settings passed as `DIREDI_*` variables.

Embedded (no broker configured): SQLite and the Celery queue in the data directory, the embedded MQTT
3.1.1 broker in this process, its admin and the cloud's passwords generated once and kept owner-only
in `<data_dir>/broker/passwords.json`. Configured (DIREDI_MQTT_URL and DIREDI_MQTT_ADMIN_URL): that
broker (the cloud's account is bootstrapped on it), DIREDI_DATABASE_URL and DIREDI_REDIS_URL as given.

    with LocalSystem(settings, api_port=8000) as system:  # start(): returns once every part is ready
        key = system.create_api_key()
        ...  # system.api_url, system.device_target(device_id, secret)
        system.check()  # raises ChildExited if a part died

The services are child processes (cloud/children.py) started from the calling thread, which they do not
outlive: start and stop a LocalSystem on one long-lived thread.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import subprocess  # noqa: S404 (our own CLI, fixed argument lists)
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from broker.client import BrokerTarget
from broker.exceptions import BrokerURLError
from cloud.children import Child, child_environment, http_ok, port_in_use
from cloud.exceptions import ChildExited, LocalSystemConfigError, LocalSystemError
from cloud.registry.tables import Role
from cloud.settings import Settings

log = logging.getLogger(__name__)

ADMIN_USER = "admin"
CLOUD_USER = "diredi-cloud"
# The services that connect to the broker, each with an account of its own bound to its client id (the
# ingest's is the one its default name gives it). They share the cloud account's password.
SERVICE_ACCOUNTS = {"ingest": "diredi-ingest-1", "worker": "diredi-worker-1"}
BROKER_STATE = "broker/dynamic-security.json"
PASSWORDS = "broker/passwords.json"


@dataclass(frozen=True)
class Passwords:
    """The embedded broker's admin and the cloud's account, generated once per data directory."""

    admin: str
    cloud: str

    @classmethod
    def load_or_create(cls, path: Path, *, broker_state: Path) -> Passwords:
        """Read `path`, or create it (0600) with new passwords if neither it nor a broker state exists."""
        if path.exists():
            if path.stat().st_mode & 0o077:
                log.warning("%s was readable by others: made owner-only", path)
                path.chmod(0o600)
            try:
                raw = json.loads(path.read_text())
                return cls(admin=str(raw["admin_password"]), cloud=str(raw["cloud_password"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise LocalSystemConfigError(
                    f"{path} is not readable as the broker's passwords: {exc}"
                ) from None
        if broker_state.exists():
            raise LocalSystemConfigError(
                f"{broker_state} exists but {path}, the admin password it was made with, does not: "
                f"restore it, or remove {broker_state.parent} to start a new broker (devices must then be "
                "provisioned again)"
            )
        passwords = cls(admin=secrets.token_urlsafe(24), cloud=secrets.token_urlsafe(24))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps({"admin_password": passwords.admin, "cloud_password": passwords.cloud})
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(text + "\n")
        return passwords


class LocalSystem:
    """The registry, the broker (embedded, or the configured one), the ingest, the worker and the API.

    `host`: the IPv4 address the API and the embedded broker listen on. `log_dir`: the children's logs
    (default `<data_dir>/logs`). `on_ready(part, detail)` is called as each part becomes ready."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        api_port: int = 8000,
        mqtt_port: int = 1883,
        worker: bool = True,
        log_dir: Path | None = None,
        ready_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        on_ready: Callable[[str, str], None] | None = None,
    ) -> None:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise LocalSystemConfigError(f"--host must be an IPv4 address, not {host!r}") from None
        self.settings = settings
        self.host = host
        self.api_port = api_port
        self.mqtt_port = mqtt_port
        self.data_dir = settings.data_dir.resolve()
        self.log_dir = (log_dir or self.data_dir / "logs").resolve()
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._on_ready = on_ready or (lambda part, detail: None)
        self.embedded = settings.mqtt_admin_url is None and "mqtt_url" not in settings.model_fields_set
        self._admin: BrokerTarget | None = None
        self._cloud: BrokerTarget | None = None
        if not self.embedded:
            self._admin, self._cloud = self._configured_broker()
        self._broker: Any = None  # EmbeddedBrokerThread (imported on start: amqtt is heavy)
        self.children: dict[str, Child] = {}
        for name, args, ready in (
            ("ingest", ["ingest"], self._ingest_ready),
            ("worker", ["worker", "--beat"], _worker_ready),
            ("api", ["api", "--host", host, "--port", str(api_port)], self._api_ready),
        ):
            if name != "worker" or worker:
                self.children[name] = Child(name, args, self.log_dir / f"{name}.log", ready)
        # Each service's own Prometheus port, where it has a setting `<name>_metrics_port` (0: none);
        # the API serves its metrics at /metrics.
        self.metrics_ports: dict[str, int] = {
            name: port for name in self.children if (port := getattr(settings, f"{name}_metrics_port", 0))
        }
        ports = {"API": api_port, **({"MQTT": mqtt_port} if self.embedded else {})}
        ports |= {f"{name} metrics": port for name, port in self.metrics_ports.items()}
        for port in ports.values():
            if not 1 <= port <= 65535:
                raise LocalSystemConfigError(f"port {port} is not between 1 and 65535")
        if len(set(ports.values())) < len(ports):
            raise LocalSystemConfigError(f"two parts cannot share a port: {ports}")
        self._ports = ports
        self._started = False
        self._stopping = False

    # --- where things are -------------------------------------------------------------------------

    @property
    def local_host(self) -> str:
        """The address a client on this machine uses (127.0.0.1 when listening on every interface)."""
        return "127.0.0.1" if self.host == "0.0.0.0" else self.host  # noqa: S104 (a comparison)

    @property
    def api_url(self) -> str:
        return f"http://{self.local_host}:{self.api_port}"

    @property
    def docs_url(self) -> str:
        return f"{self.api_url}/docs"

    @property
    def broker_target(self) -> BrokerTarget:
        """The broker devices connect to, without credentials (host, port, protocol, TLS)."""
        if self._cloud is not None and not self.embedded:
            return BrokerTarget(
                self._cloud.host, self._cloud.port, tls=self._cloud.tls, protocol=self._cloud.protocol,
                ca_file=self._cloud.ca_file,
            )  # fmt: skip
        return BrokerTarget(self.local_host, self.mqtt_port, protocol="3.1.1")

    @property
    def admin_target(self) -> BrokerTarget:
        """The broker as its dynamic-security admin (known once started, for the embedded broker)."""
        if self._admin is None:
            raise LocalSystemError("the embedded broker's accounts are known once it has started")
        return self._admin

    @property
    def cloud_target(self) -> BrokerTarget:
        """The broker as the cloud's service account (the ingest's and the publisher's)."""
        if self._cloud is None:
            raise LocalSystemError("the embedded broker's accounts are known once it has started")
        return self._cloud

    def device_target(self, device_id: str, secret: str) -> BrokerTarget:
        """The broker as one device (its username and client id are its id)."""
        return self.broker_target.with_credentials(device_id, secret)

    def device_broker_url(self, device_id: str, secret: str) -> str:
        """The MQTT URL a device connects with, password included."""
        return self.device_target(device_id, secret).url()

    @property
    def log_paths(self) -> dict[str, Path]:
        """Each child's log file."""
        return {name: child.log_path for name, child in self.children.items()}

    def environment(self) -> dict[str, str]:
        """The environment the children run with: other `diredi` commands given it use this system."""
        overrides = {"data_dir": str(self.data_dir)}
        if self._cloud is not None and self._admin is not None:
            overrides |= {"mqtt_url": self._cloud.url(), "mqtt_admin_url": self._admin.url()}
        return child_environment(self.settings, **overrides)

    def create_api_key(self, role: Role = Role.admin, name: str = "localsystem") -> str:
        """A new operator API key in this system's registry (the plaintext, shown this once)."""
        from cloud.registry import apikeys, audit
        from cloud.registry.db import make_engine, session_factory, transaction

        engine = make_engine(self.settings.resolved_database_url)
        try:
            with transaction(session_factory(engine)) as session:
                row, secret = apikeys.create_key(session, role=role, name=name)
                audit.record(
                    session, actor="localsystem", action="apikey.create", target=row.id, role=role.value
                )
        finally:
            engine.dispose()
        return secret

    # --- start, watch, stop -----------------------------------------------------------------------

    def __enter__(self) -> LocalSystem:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start every part and return once each is ready; on any failure stop what had started."""
        if self._started:
            raise LocalSystemError("already started")
        for what, port in self._ports.items():
            host = self.host if what in ("API", "MQTT") else "127.0.0.1"
            if port_in_use(host, port):
                hint = f" (DIREDI_{what.split()[0].upper()}_METRICS_PORT)" if "metrics" in what else ""
                raise LocalSystemConfigError(f"{what} port {port} is already in use on {host}{hint}")
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalSystemConfigError(f"data directory {self.data_dir}: {exc.strerror}") from None
        self._started, self._stopping = True, False
        try:
            self._migrate()
            self._check_queue()
            self._start_broker()
            env = self.environment()
            for name, child in self.children.items():
                child.start(env | self._service_account(name))
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def check(self) -> None:
        """Raise ChildExited if a part has exited (nothing while stopping)."""
        if self._stopping:
            return
        for child in self.children.values():
            code = child.process.poll() if child.process else None
            if code is not None:
                raise ChildExited(child.name, code, child.log_path, child.tail())
        if self._broker is not None and not self._broker.broker.running:
            raise LocalSystemError("the embedded broker stopped")

    def stop(self) -> list[str]:
        """SIGTERM to every child, wait up to `stop_timeout`, SIGKILL what is left; then stop the
        embedded broker. Returns the parts that had to be killed. Safe to call twice."""
        self._stopping = True
        running = [
            (name, child.process)
            for name, child in reversed(self.children.items())
            if child.process is not None and child.process.poll() is None
        ]
        for _, process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        killed = []
        for name, process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s: killed", name, self.stop_timeout)
                process.kill()
                process.wait()
                killed.append(name)
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.stop()
        self._started = False
        return killed

    # --- the parts --------------------------------------------------------------------------------

    def _configured_broker(self) -> tuple[BrokerTarget, BrokerTarget]:
        settings = self.settings
        if settings.mqtt_admin_url is None or "mqtt_url" not in settings.model_fields_set:
            missing = "DIREDI_MQTT_ADMIN_URL" if settings.mqtt_admin_url is None else "DIREDI_MQTT_URL"
            raise LocalSystemConfigError(
                f"{missing} is not set: a configured broker needs both DIREDI_MQTT_URL (the cloud's "
                "account) and DIREDI_MQTT_ADMIN_URL; set neither for the embedded broker"
            )
        targets = []
        for name, url in (("ADMIN_URL", settings.mqtt_admin_url), ("URL", settings.mqtt_url)):
            try:
                target = BrokerTarget.parse(url.get_secret_value(), ca_file=settings.mqtt_ca_file)
            except BrokerURLError as exc:
                raise LocalSystemConfigError(f"DIREDI_MQTT_{name}: {exc}") from None
            if not target.username or not target.password:
                raise LocalSystemConfigError(f"DIREDI_MQTT_{name} must hold a username and a password")
            targets.append(target)
        return targets[0], targets[1]

    def _migrate(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        from cloud.registry import migrate
        from cloud.registry.db import make_engine

        engine = make_engine(self.settings.resolved_database_url)
        where = engine.url.render_as_string()  # the password masked
        try:
            migrate.upgrade(engine)
            revision = migrate.current(engine)
        except SQLAlchemyError as exc:
            raise LocalSystemError(f"the registry at {where} cannot be migrated: {exc}") from None
        finally:
            engine.dispose()
        self._on_ready("registry", f"{where} at revision {revision}")

    def _check_queue(self) -> None:
        url = self.settings.redis_url
        if url is None:
            self._on_ready("queue", f"embedded, {self.settings.resolved_queue_url}")
            return
        import redis

        parts = urlsplit(url)
        where = f"{parts.hostname}:{parts.port or 6379}"
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3) as client:
                client.ping()
        except redis.RedisError as exc:
            raise LocalSystemError(f"Redis at {where} (DIREDI_REDIS_URL) does not answer: {exc}") from None
        self._on_ready("queue", f"Redis at {where}")

    def _start_broker(self) -> None:
        from broker.exceptions import BrokerAdminError
        from broker.mosquitto import bootstrap, ensure_service_account

        if self.embedded:
            from broker.embedded_thread import EmbeddedBrokerThread
            from broker.exceptions import EmbeddedBrokerError

            state = self.data_dir / BROKER_STATE
            passwords = Passwords.load_or_create(self.data_dir / PASSWORDS, broker_state=state)
            broker = EmbeddedBrokerThread(
                state,
                host=self.host,
                port=self.mqtt_port,
                admin_user=ADMIN_USER,
                admin_password=passwords.admin,
            )
            try:
                broker.start()
            except EmbeddedBrokerError as exc:
                raise LocalSystemError(f"the embedded broker: {exc}") from None
            self._broker = broker
            where = BrokerTarget(self.local_host, self.mqtt_port, protocol="3.1.1")
            self._admin = where.with_credentials(ADMIN_USER, passwords.admin)
            self._cloud = where.with_credentials(CLOUD_USER, passwords.cloud)
        admin, cloud = self.admin_target, self.cloud_target
        try:
            bootstrap(admin, cloud_user=str(cloud.username), cloud_password=str(cloud.password))
            for child in self.children:
                if child in SERVICE_ACCOUNTS:
                    ensure_service_account(admin, SERVICE_ACCOUNTS[child], str(cloud.password))
        except BrokerAdminError as exc:
            raise LocalSystemError(f"cannot set up the cloud's account on the broker: {exc}") from None
        kind = "embedded" if self.embedded else "configured"
        self._on_ready("broker", f"{kind}, {self.broker_target}; the cloud's account {cloud.username}")

    def _service_account(self, child: str) -> dict[str, str]:
        """The ingest's and the worker's own broker accounts (bound to their client ids), as variables."""
        if child not in SERVICE_ACCOUNTS:
            return {}
        name, cloud = SERVICE_ACCOUNTS[child], self.cloud_target
        url = cloud.with_credentials(name, str(cloud.password)).url()
        return {"DIREDI_MQTT_URL": url, "DIREDI_MQTT_CLIENT_ID": name}

    def _wait_ready(self) -> None:
        pending = dict(self.children)
        deadline = time.monotonic() + self.ready_timeout
        while pending:
            self.check()
            for name, child in list(pending.items()):
                if child.ready(child):
                    del pending[name]
                    self._on_ready(name, self._describe(name))
            if pending and time.monotonic() > deadline:
                names = ", ".join(pending)
                tails = "\n".join(f"--- {c.log_path}:\n{c.tail()}" for c in pending.values())
                raise LocalSystemError(f"not ready within {self.ready_timeout:g} s: {names}\n{tails}")
            time.sleep(0.1)

    def _describe(self, name: str) -> str:
        if name == "api":
            return f"{self.api_url} (docs {self.docs_url})"
        port = self.metrics_ports.get(name)
        return f"metrics {self.metrics_url(port)}" if port else "running"

    def metrics_url(self, port: int) -> str:
        """Where a client on this machine reads a child's metrics: on `metrics_host`, or on loopback when
        they listen on every interface."""
        host = self.settings.metrics_host
        if host in ("0.0.0.0", "::"):  # noqa: S104 (a comparison)
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def _api_ready(self, child: Child) -> bool:
        return http_ok(f"{self.api_url}/healthz") is not None

    def _ingest_ready(self, child: Child) -> bool:
        port = self.metrics_ports.get("ingest")
        if port:  # the gauge is 1 once connected and subscribed
            return "diredi_ingest_connected 1.0" in (http_ok(self.metrics_url(port)) or "")
        return "subscribed to" in child.output()


def _worker_ready(child: Child) -> bool:
    return re.search(r"@\S+ ready\.", child.output()) is not None  # Celery's "<name>@<host> ready."
