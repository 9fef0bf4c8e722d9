"""`diredi up` and `LocalSystem`: the whole system on one machine, embedded and configured.

`diredi up` runs as a real subprocess on a data directory of the test's own and free ports; the
configured system (mosquitto, PostgreSQL, Redis) runs through the library, as an end-to-end test would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import psutil
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from broker.client import BrokerTarget
from cloud.children import free_ports, port_in_use
from cloud.exceptions import ChildExited, LocalSystemConfigError
from cloud.localsystem import BROKER_STATE, PASSWORDS, SERVICE_ACCOUNTS, LocalSystem, Passwords
from cloud.registry.db import make_engine
from cloud.registry.tables import Device
from cloud.settings import Settings
from tests.brokers import Probe, new_device_id, running_mosquitto
from tests.databases import postgres_admin_url
from tests.polling import wait_until
from tests.redis_server import running_redis
from testsupport.postgres import scratch_database
from wire.messages import Presence, PresenceState, encode
from wire.topics import MessageKind, device_topic

DIREDI = Path(sys.executable).with_name("diredi")
READY_TIMEOUT = 120.0  # two cores shared with other tests: importing the API takes seconds
STOP_TIMEOUT = 30.0
UP_LINE = "DiReDi is up"


def clean_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """This environment without any DIREDI_ setting, plus the data directory and `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DIREDI_")}
    env |= {"DIREDI_DATA_DIR": str(data_dir), "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return env | {f"DIREDI_{name.upper()}": value for name, value in settings.items()}


class Up:
    """`diredi up` as a child process of the test, its output in files."""

    def __init__(self, tmp: Path, data_dir: Path, *args: str, **settings: str) -> None:
        self.api_port, self.mqtt_port, ingest_metrics, worker_metrics = free_ports(4)
        self.data_dir = data_dir
        ports = {"ingest_metrics_port": str(ingest_metrics), "worker_metrics_port": str(worker_metrics)}
        self.env = clean_env(data_dir, **ports, **settings)
        self.args = ["--api-port", str(self.api_port), "--mqtt-port", str(self.mqtt_port)]
        self.args += args
        self.stdout_path, self.stderr_path = tmp / f"up-{self.api_port}.out", tmp / f"up-{self.api_port}.err"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def run(self, timeout: float = 60.0) -> int:
        """Run to the end (for options refused before anything starts)."""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            return subprocess.run(
                [str(DIREDI), "up", *self.args], env=self.env, stdout=out, stderr=err, timeout=timeout
            ).returncode

    def start(self) -> None:
        """Start it and wait until it says it is up."""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [str(DIREDI), "up", *self.args], env=self.env, stdout=out, stderr=err
            )
        process = self.process
        wait_until(
            lambda: UP_LINE in self.stdout or process.poll() is not None,
            READY_TIMEOUT,
            lambda: f"not up:\n{self.stdout}\n{self.stderr}",
        )
        assert process.poll() is None, f"exited {process.returncode}:\n{self.stdout}\n{self.stderr}"

    def children(self, recursive: bool = True) -> list[psutil.Process]:
        """Its children (and theirs: Celery's beat runs in a process of the worker's)."""
        assert self.process is not None
        return psutil.Process(self.process.pid).children(recursive=recursive)

    def child(self, part: str) -> psutil.Process:
        """The child running `diredi <part>`."""
        (found,) = [c for c in self.children(recursive=False) if part in c.cmdline()[4:5]]
        return found

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def close(self) -> None:
        """Whatever the test did: nothing of it left running."""
        if self.process is None or self.process.poll() is not None:
            return
        children = self.children()
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for child in children:
            if child.is_running():
                child.kill()


@contextmanager
def running_up(tmp: Path, data_dir: Path, *args: str, **settings: str) -> Iterator[Up]:
    up = Up(tmp, data_dir, *args, **settings)
    try:
        up.start()
        yield up
    finally:
        up.close()


def create_key(up: Up) -> str:
    """`diredi apikey create --role admin` on the same data directory; the key it printed."""
    result = subprocess.run(
        [str(DIREDI), "apikey", "create", "--role", "admin"],
        env=up.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip().splitlines()[-1]


def provision(api: str, key: str, device_id: str, cohort: str = "home-cams") -> str:
    """Create the cohort if needed and provision `device_id` through the API; its secret."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=api, headers=headers, timeout=30) as client:
        answer = client.post("/api/v1/cohorts", json={"id": cohort})
        assert answer.status_code in (201, 409), answer.text
        answer = client.post("/api/v1/devices", json={"id": device_id, "cohort_id": cohort})
        assert answer.status_code == 201, answer.text
        secret: str = answer.json()["secret"]
        return secret


def presence(api: str, key: str, device_id: str) -> str:
    answer = httpx.get(f"{api}/api/v1/devices/{device_id}", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    state: str = answer.json()["presence"]
    return state


def go_online(target: BrokerTarget, device_id: str) -> None:
    """Connect as the device and publish its presence (the ingest records it)."""
    with Probe(target, device_id) as probe:
        reason = probe.connect()
        assert reason is not None and not reason.is_failure, reason
        message = encode(Presence(device_id=device_id, state=PresenceState.online, conn="test-1"))
        reason = probe.publish(device_topic(device_id, MessageKind.PRESENCE), message, retain=True)
        assert reason is not None and not reason.is_failure


def device_target(up: Up, device_id: str, secret: str) -> BrokerTarget:
    return BrokerTarget("127.0.0.1", up.mqtt_port, protocol="3.1.1").with_credentials(device_id, secret)


# --- diredi up, embedded ----------------------------------------------------------------------------


def test_up_runs_the_system_devices_can_use_and_stops_on_sigint(tmp_path: Path) -> None:
    with running_up(tmp_path, tmp_path / "data") as up:
        assert httpx.get(f"{up.api}/healthz").json() == {"status": "ok"}
        for part in ("registry", "queue", "broker", "ingest", "worker", "api"):
            assert f"✓ {part}" in up.stdout
        assert f"mqtt://127.0.0.1:{up.mqtt_port}?protocol=3.1.1" in up.stdout
        assert str((tmp_path / "data" / "logs").resolve()) in up.stdout
        key = create_key(up)
        device_id = new_device_id("cam")
        secret = provision(up.api, key, device_id)

        go_online(device_target(up, device_id, secret), device_id)
        with Probe(device_target(up, device_id, secret + "x"), device_id) as wrong:
            refused = wrong.connect()
        wait_until(lambda: presence(up.api, key, device_id) == "online", 15, "the ingest never stored it")
        assert sorted(c.cmdline()[4] for c in up.children(recursive=False)) == ["api", "ingest", "worker"]
        children = up.children()
        assert up.process is not None
        up.process.send_signal(signal.SIGINT)
        code = up.wait()

    assert refused is not None and refused.is_failure
    assert code == 0, up.stderr
    assert "stopped" in up.stdout
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not port_in_use("127.0.0.1", up.api_port) and not port_in_use("127.0.0.1", up.mqtt_port)


def test_up_reports_a_part_that_died_and_stops_everything(tmp_path: Path) -> None:
    with running_up(tmp_path, tmp_path / "data") as up:
        children = up.children()
        up.child("ingest").send_signal(signal.SIGKILL)
        code = up.wait()

    assert code not in (0, None)
    assert "ingest exited unexpectedly (killed by SIGKILL)" in up.stderr
    assert "ingest.log" in up.stderr and "subscribed to" in up.stderr  # the tail of its log
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_the_children_end_when_up_itself_is_killed(tmp_path: Path) -> None:
    with running_up(tmp_path, tmp_path / "data") as up:
        children = up.children()
        assert up.process is not None
        up.process.kill()
        up.wait()

        def running() -> list[psutil.Process]:
            alive = []
            for child in children:
                with suppress(psutil.NoSuchProcess):  # gone between the two questions
                    if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                        alive.append(child)
            return alive

        def logs() -> str:  # a part that stopped in time exits; one that hangs dumps its stacks first
            names = [c.cmdline()[4] for c in running()]
            tails = [(up.data_dir / "logs" / f"{n}.log").read_text()[-4000:] for n in names]
            return f"still running: {names}\n" + "\n".join(tails)

        wait_until(lambda: not running(), STOP_TIMEOUT, logs)


def test_a_second_up_on_the_same_data_directory_reuses_its_secrets(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_up(tmp_path, data) as first:
        key = create_key(first)
        device_id = new_device_id("cam")
        secret = provision(first.api, key, device_id)
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        assert first.wait() == 0, first.stderr
    passwords = (data / PASSWORDS).read_text()

    with running_up(tmp_path, data) as second:  # other ports, same data
        go_online(device_target(second, device_id, secret), device_id)
        wait_until(lambda: presence(second.api, key, device_id) == "online", 15, "not stored")

    assert (data / PASSWORDS).read_text() == passwords
    for path in (data / PASSWORDS, data / BROKER_STATE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(json.loads(passwords)) == {"admin_password", "cloud_password"}


@pytest.mark.parametrize(
    ("args", "settings", "said"),
    [
        (["--host", "localhost"], {}, "IPv4 address"),
        (["--api-port", "70000"], {}, "less than or equal to 65535"),
        ([], {"mqtt_url": "mqtt://cloud:pw@127.0.0.1:1"}, "DIREDI_MQTT_ADMIN_URL is not set"),
        ([], {"mqtt_admin_url": "mqtt://admin:pw@127.0.0.1:1"}, "DIREDI_MQTT_URL is not set"),
        ([], {"redis_url": "http://127.0.0.1:1"}, "redis_url"),
        ([], {"ingest_metrics_port": "PORT"}, "share a port"),
    ],
)
def test_bad_options_and_settings_start_nothing(
    tmp_path: Path, args: list[str], settings: dict[str, str], said: str
) -> None:
    up = Up(tmp_path, tmp_path / "data", *args)
    up.env |= {f"DIREDI_{k.upper()}": v.replace("PORT", str(up.api_port)) for k, v in settings.items()}

    code = up.run()

    assert code == 2, up.stdout + up.stderr
    assert said in " ".join(up.stderr.split()), up.stderr
    assert not (tmp_path / "data" / "registry.db").exists()


@pytest.mark.parametrize("which", ["API", "MQTT"])
def test_a_port_in_use_is_named(tmp_path: Path, which: str) -> None:
    up = Up(tmp_path, tmp_path / "data")
    port = up.api_port if which == "API" else up.mqtt_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()

        code = up.run()

    assert code == 2, up.stdout + up.stderr
    assert f"{which} port {port} is already in use" in up.stderr
    assert not (tmp_path / "data" / "registry.db").exists()
    assert not (tmp_path / "data" / "broker").exists()


# --- LocalSystem ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics_host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:9102/metrics"),
        ("0.0.0.0", "http://127.0.0.1:9102/metrics"),  # noqa: S104 (the setting under test)
        ("::", "http://[::1]:9102/metrics"),
        ("::1", "http://[::1]:9102/metrics"),
        ("10.1.2.3", "http://10.1.2.3:9102/metrics"),
    ],
)
def test_the_childrens_metrics_are_read_where_they_listen(metrics_host: str, url: str) -> None:
    system = LocalSystem(Settings(data_dir=Path("unused"), metrics_host=metrics_host))

    assert system.metrics_url(9102) == url


def test_half_a_broker_configuration_is_refused() -> None:
    settings = Settings(data_dir=Path("unused"), mqtt_url=SecretStr("mqtt://cloud:pw@127.0.0.1:1"))
    with pytest.raises(LocalSystemConfigError, match="DIREDI_MQTT_ADMIN_URL"):
        LocalSystem(settings)
    settings = Settings(
        data_dir=Path("unused"),
        mqtt_url=SecretStr("mqtt://127.0.0.1:1"),
        mqtt_admin_url=SecretStr("mqtt://admin:pw@127.0.0.1:1"),
    )
    with pytest.raises(LocalSystemConfigError, match="DIREDI_MQTT_URL must hold a username"):
        LocalSystem(settings)


def test_a_broker_state_without_its_passwords_is_refused(tmp_path: Path) -> None:
    state = tmp_path / BROKER_STATE
    state.parent.mkdir()
    state.write_text("{}")
    with pytest.raises(LocalSystemConfigError, match="passwords.json"):
        Passwords.load_or_create(tmp_path / PASSWORDS, broker_state=state)


def test_configured_system_on_mosquitto_postgresql_and_redis(tmp_path: Path) -> None:
    with (
        running_mosquitto(tmp_path / "mosquitto") as broker,
        scratch_database(postgres_admin_url(), prefix="diredi_up") as database_url,
        running_redis(tmp_path / "redis") as redis_url,
    ):
        api_port, ingest_metrics, worker_metrics = free_ports(3)
        settings = Settings(
            data_dir=tmp_path / "data",
            mqtt_url=SecretStr(broker.cloud.url()),
            mqtt_admin_url=SecretStr(broker.admin.url()),
            database_url=database_url,
            redis_url=redis_url,
            ingest_metrics_port=ingest_metrics,
            worker_metrics_port=worker_metrics,
        )
        ready: list[str] = []
        with LocalSystem(settings, api_port=api_port, on_ready=lambda part, _: ready.append(part)) as system:
            key = system.create_api_key()
            device_id = new_device_id("cam")
            secret = provision(system.api_url, key, device_id)
            go_online(system.device_target(device_id, secret), device_id)
            wait_until(lambda: presence(system.api_url, key, device_id) == "online", 15, "not stored")
            environments = {name: psutil.Process(c.pid).environ() for name, c in system.children.items()}
            system.check()
            children = [psutil.Process(c.pid) for c in system.children.values()]
            worker_log = system.children["worker"].output()

            api = system.children["api"]
            assert api.pid is not None
            os.kill(api.pid, signal.SIGKILL)
            died = wait_until(lambda: _raised(system), 15, "check() never noticed")

        engine = make_engine(database_url)
        with engine.connect() as connection:
            stored = connection.execute(select(Device.id)).scalars().all()
        engine.dispose()

    assert not system.embedded and system.broker_target == broker.target
    assert set(ready[:3]) == {"registry", "queue", "broker"}
    assert set(ready[3:]) == {"ingest", "worker", "api"}  # in the order they became ready
    redis_port = redis_url.rsplit(":", 1)[1]  # "PORT/0"; Celery shows the URL with a masked password
    assert re.search(rf"Connected to redis://\S*127\.0\.0\.1:{redis_port}\b", worker_log), worker_log
    assert stored == [device_id]
    for name, env in environments.items():
        assert env["DIREDI_REDIS_URL"] == redis_url
        assert env["DIREDI_DATABASE_URL"] == database_url
        # the ingest and the worker each log in with an account of their own, bound to their client id
        own = SERVICE_ACCOUNTS.get(name)
        account = broker.cloud.with_credentials(own, str(broker.cloud.password)) if own else broker.cloud
        assert env["DIREDI_MQTT_URL"] == account.url()
        assert env.get("DIREDI_MQTT_CLIENT_ID") == own
    assert isinstance(died, ChildExited) and died.name == "api" and "SIGKILL" in str(died)
    assert not (tmp_path / "data" / "broker").exists()  # no embedded broker
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_a_part_that_ignores_sigterm_is_killed_after_the_stop_timeout(tmp_path: Path) -> None:
    api_port, mqtt_port, metrics_port = free_ports(3)
    settings = Settings(data_dir=tmp_path / "data", ingest_metrics_port=metrics_port)
    system = LocalSystem(settings, api_port=api_port, mqtt_port=mqtt_port, worker=False, stop_timeout=2)
    system.start()
    try:
        assert system.embedded and system.broker_target.port == mqtt_port
        children = [psutil.Process(c.pid) for c in system.children.values()]
        psutil.Process(system.children["api"].pid).suspend()  # SIGSTOP: SIGTERM waits, SIGKILL does not

        killed = system.stop()
    finally:
        system.stop()

    assert killed == ["api"]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not port_in_use("127.0.0.1", mqtt_port)  # the embedded broker stopped too


def _raised(system: LocalSystem) -> ChildExited | None:
    try:
        system.check()
    except ChildExited as exc:
        return exc
    return None
