"""`diredi broker init`: a production mosquitto set up from nothing, run again, forced, and refused."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.exceptions import MosquittoError
from broker.mosquitto import find_binary, find_plugin
from cloud.children import free_ports
from cloud.fleet_ca import FleetCA
from device_firmware_py.identity import device_key, signing_request
from tests.broker.certificates import close, connect
from tests.brokers import CERTS_SCRIPT, Probe
from testsupport.mosquitto import MosquittoProcess

DIREDI = Path(sys.executable).parent / "diredi"
ROOT = Path(__file__).resolve().parents[2]
NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module", autouse=True)
def _needs_mosquitto() -> None:
    try:
        find_binary("mosquitto")
        find_binary("mosquitto_ctrl")
        find_plugin()
    except MosquittoError as exc:
        pytest.skip(f"no mosquitto here: {exc}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lab certificates for the TLS listener (broker/certs.sh; never for production)."""
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run([str(CERTS_SCRIPT), str(directory)], check=True, capture_output=True, timeout=60)
    return directory


@dataclass
class Install:
    """Where one `broker init` puts things, and its ports."""

    state: Path
    certs: Path
    credentials: Path
    port: int
    tls_port: int

    def args(self, **changes: object) -> list[str]:
        values = {
            "--state-dir": self.state,
            "--cert-dir": self.certs,
            "--credentials": self.credentials,
            "--port": self.port,
            "--tls-port": self.tls_port,
            "--tls-bind": "127.0.0.1",  # the tests' traffic stays on loopback
        }
        values.update({f"--{k.replace('_', '-')}": v for k, v in changes.items()})
        return [part for option, value in values.items() for part in (option, str(value))]

    def urls(self) -> dict[str, BrokerTarget]:
        """The URLs the credentials file gives the operator, by variable."""
        found = re.findall(
            r"^(DIREDI_MQTT_\w+_URL|DIREDI_MQTT_URL)=(\S+)$", self.credentials.read_text(), re.M
        )
        return {name: BrokerTarget.parse(url) for name, url in found}


@pytest.fixture
def install(tmp_path: Path, certs: Path) -> Install:
    port, tls_port = free_ports(2)
    return Install(tmp_path / "broker", certs, tmp_path / "etc" / "broker.env", port, tls_port)


def broker_init(*args: str) -> subprocess.CompletedProcess[str]:
    """`diredi broker init ARGS` as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIREDI_")} | {"COLUMNS": "300"}
    return subprocess.run(  # noqa: S603
        [str(DIREDI), "broker", "init", *args], capture_output=True, text=True, timeout=120, env=env
    )


def snapshot(*directories: Path) -> dict[Path, tuple[bytes, int, int]]:
    """Every file's bytes, modification time and mode."""
    return {
        path: (path.read_bytes(), path.stat().st_mtime_ns, stat.S_IMODE(path.stat().st_mode))
        for directory in directories
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def running(install: Install) -> Iterator[MosquittoProcess]:
    """The broker `broker init` set up, started from its rendered configuration."""
    (install.credentials.parent).mkdir()
    done = broker_init(*install.args())
    assert done.returncode == 0, done.stderr
    process = MosquittoProcess(install.state, port=install.port)
    process.start()
    yield process
    process.stop()


def test_init_makes_a_broker_the_cloud_logs_into_and_strangers_do_not(
    install: Install, running: MosquittoProcess
) -> None:
    # Prepare
    urls = install.urls()
    cloud, admin = urls["DIREDI_MQTT_URL"], urls["DIREDI_MQTT_ADMIN_URL"]
    ca_file = install.certs / "ca.crt"
    tls = BrokerTarget(
        "127.0.0.1", install.tls_port, cloud.username, cloud.password, tls=True, ca_file=ca_file
    )

    # Execute
    with Probe(cloud, "diredi-ingest-test") as service, Probe(tls, "diredi-tls-test") as over_tls:
        connected = service.connect()
        connected_tls = over_tls.connect()
        shared = service.subscribe("$share/ingest/diredi/v1/dev/+/status")
        outside = service.subscribe("elsewhere/#")
    with Probe(BrokerTarget("127.0.0.1", install.port), "anonymous-1") as anonymous:
        refused = anonymous.connect()
    with Probe(cloud.with_credentials(str(cloud.username), "wrong"), "diredi-wrong") as wrong:
        refused_wrong = wrong.connect()
    with DynsecAdmin(admin) as dynsec:
        clients = dynsec.execute([{"command": "listClients"}])[0]["data"]["clients"]

    # Assert
    assert (cloud.username, admin.username) == ("diredi-cloud", "admin")
    assert (cloud.host, cloud.port, cloud.tls) == ("127.0.0.1", install.port, False)
    assert connected == 0 and connected_tls == 0
    assert shared < 0x80 and outside == NOT_AUTHORIZED  # deny by default, the cloud's role on diredi/v1
    assert refused == NOT_AUTHORIZED and refused_wrong == NOT_AUTHORIZED
    assert sorted(clients) == ["admin", "diredi-cloud"]
    for secret in (install.credentials, install.state / "dynamic-security.json"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert f"listener {install.port} 127.0.0.1" in (install.state / "mosquitto.conf").read_text()


def test_init_with_certificate_devices_admits_the_fleet_cas_devices_and_the_cloud_over_tls(
    install: Install, tmp_path: Path
) -> None:
    # Prepare
    install.credentials.parent.mkdir()
    fleet_ca = tmp_path / "fleet-ca"
    args = install.args(devices="certificate", fleet_ca=fleet_ca)

    # Execute: set up, started, run again
    done = broker_init(*args)
    assert done.returncode == 0, done.stderr
    ca = FleetCA.open(fleet_ca)
    (tmp_path / "device").mkdir()
    issued = ca.issue(signing_request(device_key(tmp_path / "device"), "cam-0001"), "cam-0001")
    (tmp_path / "device" / "cert.pem").write_text(issued.pem)
    with MosquittoProcess(install.state, port=install.port):
        cloud = install.urls()["DIREDI_MQTT_URL"]
        ca_file = re.search(r"^DIREDI_MQTT_CA_FILE=(\S+)$", install.credentials.read_text(), re.M)
        assert ca_file is not None
        with Probe(replace(cloud, ca_file=Path(ca_file[1])), "diredi-ingest-test") as service:
            connected = service.connect()
        device = connect(
            install.tls_port,
            install.certs / "ca.crt",
            cert=(tmp_path / "device" / "cert.pem", tmp_path / "device" / "identity.key"),
            client_id="cam-0001",
        )
        stranger = connect(install.tls_port, install.certs / "ca.crt", client_id="cam-0002")
        admitted, refused = device.connected.is_set() and device.refused, stranger.refused
        close(device, stranger)
    again = broker_init(*args)

    # Assert: the cloud over TLS on the services' listener, the device by its certificate, no one without
    assert cloud.tls and connected == 0
    assert admitted == "" and refused
    assert (install.state / "devices.acl").read_text().startswith("#")
    assert re.search(
        r"^DIREDI_INGEST_GROUP=diredi-ingest-[0-9a-f]{32}$", install.credentials.read_text(), re.M
    )
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr


def test_a_second_run_changes_nothing_and_says_so(install: Install, running: MosquittoProcess) -> None:
    # Prepare
    running.stop()
    before = snapshot(install.state, install.credentials.parent)

    # Execute
    again = broker_init(*install.args())

    # Assert
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stdout
    assert "written" not in again.stdout and "overwritten" not in again.stdout
    assert snapshot(install.state, install.credentials.parent) == before


def test_a_file_that_differs_is_overwritten_only_with_force(
    install: Install, running: MosquittoProcess
) -> None:
    # Prepare
    running.stop()
    passwords = {name: url.password for name, url in install.urls().items()}
    before = snapshot(install.state, install.credentials.parent)
    (new_port,) = free_ports(1)

    # Execute
    refused = broker_init(*install.args(port=new_port))
    unchanged = snapshot(install.state, install.credentials.parent)
    forced = broker_init(*install.args(port=new_port), "--force")
    moved = MosquittoProcess(install.state, port=new_port)
    moved.start()
    try:
        cloud = install.urls()["DIREDI_MQTT_URL"]
        with Probe(cloud, "diredi-after-force") as probe:
            connected = probe.connect()
    finally:
        moved.stop()

    # Assert
    assert refused.returncode == 2
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert unchanged == before
    assert forced.returncode == 0, forced.stderr
    assert "overwritten" in forced.stdout
    assert cloud.port == new_port
    assert {name: url.password for name, url in install.urls().items()} == passwords  # kept, not rotated
    assert connected == 0


def test_init_refuses_while_a_broker_listens_on_its_port(
    install: Install, running: MosquittoProcess, tmp_path: Path
) -> None:
    # Execute: another state directory, on the port the running broker holds
    done = broker_init(*install.args(state_dir=tmp_path / "other", credentials=tmp_path / "other.env"))

    # Assert
    assert done.returncode == 2
    assert "something listens on" in done.stderr
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.env").exists()


def _garbage(install: Install, tmp_path: Path) -> dict[str, list[str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "not-ours.env").write_text("PASSWORD=hunter2\n")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "dynamic-security.json").write_text("{}")
    return {
        "port 0": install.args(port=0),
        "port 70000": install.args(tls_port=70000),
        "one port twice": install.args(tls_port=install.port),
        "port not a number": install.args(port="eighty"),
        "tls-bind not an address": install.args(tls_bind="every-interface"),
        "unknown user": install.args(user="no-such-user-diredi"),
        "state dir is a file": install.args(state_dir=a_file),
        "state dir under a file": install.args(state_dir=a_file / "broker"),
        "state dir on a read-only file system": install.args(state_dir="/proc/diredi-broker"),
        "state dir with a space": install.args(state_dir=tmp_path / "my broker"),
        "no certificates": install.args(cert_dir=tmp_path),
        "credentials a directory": install.args(credentials=tmp_path),
        "credentials in a missing directory": install.args(credentials=tmp_path / "no" / "such.env"),
        "credentials not ours": install.args(credentials=tmp_path / "not-ours.env"),
        "dynamic security without its credentials": install.args(
            state_dir=tmp_path / "lonely", credentials=tmp_path / "lonely.env"
        ),
    }


GARBAGE = [
    "port 0",
    "port 70000",
    "one port twice",
    "port not a number",
    "tls-bind not an address",
    "unknown user",
    "state dir is a file",
    "state dir under a file",
    "state dir on a read-only file system",
    "state dir with a space",
    "no certificates",
    "credentials a directory",
    "credentials in a missing directory",
    "credentials not ours",
    "dynamic security without its credentials",
]


@pytest.mark.parametrize("case", GARBAGE)
def test_garbage_arguments_are_refused_in_one_line(install: Install, tmp_path: Path, case: str) -> None:
    # Prepare
    args = _garbage(install, tmp_path)[case]
    before = snapshot(tmp_path)

    # Execute
    done = broker_init(*args)

    # Assert
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    if case != "port not a number":  # typer's own usage error, boxed
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert snapshot(tmp_path) == before  # nothing written


def test_the_deploy_docs_broker_init_runs_as_written(install: Install, certs: Path, tmp_path: Path) -> None:
    """docs/deploy.md's `diredi broker init` line, with its paths moved under a temporary directory and
    its ports to free ones: the broker it sets up starts and takes the cloud's account."""
    # Prepare
    text = (ROOT / "docs" / "deploy.md").read_text()
    line = re.search(r"^.*diredi broker init (.*(?:\\\n.*)*)$", text, re.MULTILINE)
    assert line is not None, "docs/deploy.md has no `diredi broker init` line"
    args = shlex.split(line.group(1).replace("\\\n", " "), comments=True)
    moved = {
        "/var/lib/diredi-broker": str(install.state),
        "/etc/diredi-broker/certs": str(certs),
        "/etc/diredi/broker-credentials.env": str(install.credentials),
        "1883": str(install.port),
        "8883": str(install.tls_port),
    }
    args = [moved.get(arg, arg) for arg in args if arg not in ("--user", "mosquitto")]
    args += ["--tls-bind", "127.0.0.1"]
    install.credentials.parent.mkdir()

    # Execute
    done = broker_init(*args)
    process = MosquittoProcess(install.state, port=install.port)
    process.start()
    try:
        with Probe(install.urls()["DIREDI_MQTT_URL"], "diredi-doc-test") as probe:
            connected = probe.connect()
    finally:
        process.stop()

    # Assert
    assert done.returncode == 0, done.stderr
    assert set(moved.values()) <= set(args), f"the doc's line names other paths or ports: {args}"
    assert connected == 0
