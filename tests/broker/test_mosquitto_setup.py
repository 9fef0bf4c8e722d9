"""mosquitto set up as in production: the rendered configuration, dynamic security initialised once, the
process with room for thousands of connections, the bootstrap and the services' own accounts."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.exceptions import MosquittoError
from broker.mosquitto import bootstrap, ensure_service_account, init_dynsec, render_config
from cloud.children import free_ports
from tests.broker.test_mosquitto import NOT_AUTHORIZED
from tests.brokers import CERTS_SCRIPT, Probe, RunningBroker, new_device_id
from testsupport.mosquitto import MosquittoProcess
from wire.topics import MessageKind, device_filter


@pytest.fixture(scope="module")
def lab_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    certs = tmp_path_factory.mktemp("certs")
    subprocess.run([str(CERTS_SCRIPT), str(certs)], check=True, capture_output=True, timeout=60)
    return certs


def test_render_config_fills_in_every_placeholder(tmp_path: Path, lab_certs: Path) -> None:
    # Execute
    config = render_config(tmp_path / "state", port=11883, tls_port=18883, cert_dir=lab_certs)

    # Assert
    text = config.read_text()
    assert config == (tmp_path / "state" / "mosquitto.conf").resolve()
    assert re.search(r"@[A-Z_]+@", text) is None
    assert "listener 11883 127.0.0.1\n" in text  # the plain listener is loopback only
    assert "listener 18883\n" in text  # TLS on every interface unless told otherwise
    assert f"certfile {lab_certs.resolve()}/server.crt\n" in text
    assert f"plugin_opt_config_file {(tmp_path / 'state').resolve()}/dynamic-security.json\n" in text
    for line in ("allow_anonymous false", "per_listener_settings false", "persistence true"):
        assert f"{line}\n" in text


def test_render_config_refuses_a_value_mosquitto_would_split(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(MosquittoError, match="CERT_DIR"):
        render_config(tmp_path, port=11883, tls_port=18883, cert_dir=tmp_path / "my certs")


def test_init_dynsec_keeps_an_existing_file(tmp_path: Path) -> None:
    # Prepare
    if shutil.which("mosquitto_ctrl") is None:
        pytest.skip("mosquitto_ctrl is not installed")
    passwords = [secrets.token_urlsafe(16) for _ in range(2)]
    first = init_dynsec(tmp_path, admin_user="admin", admin_password=passwords[0])
    before = first.read_bytes()

    # Execute
    again = init_dynsec(tmp_path, admin_user="admin", admin_password=passwords[1])

    # Assert
    assert again == first and again.read_bytes() == before
    assert json.loads(before)["clients"][0]["username"] == "admin"
    assert passwords[0] not in before.decode()  # stored as a salted hash
    assert first.stat().st_mode & 0o077 == 0


@pytest.fixture
def own_broker(mosquitto: RunningBroker, tmp_path: Path, lab_certs: Path) -> Iterator[MosquittoProcess]:
    """A second mosquitto of its own (the session's broker proves mosquitto is installed)."""
    port, tls_port = free_ports(2)
    render_config(tmp_path, port=port, tls_port=tls_port, cert_dir=lab_certs, tls_bind="127.0.0.1")
    init_dynsec(tmp_path, admin_user="admin", admin_password=secrets.token_urlsafe(16))
    process = MosquittoProcess(tmp_path, port=port)
    yield process
    process.kill()


def test_the_broker_starts_with_room_for_thousands_of_connections_and_saves_on_stop(
    own_broker: MosquittoProcess,
) -> None:
    # Execute
    own_broker.start()
    limits = Path(f"/proc/{own_broker.pid}/limits").read_text()
    own_broker.stop()

    # Assert
    soft = next(line.split()[3] for line in limits.splitlines() if line.startswith("Max open files"))
    assert soft == "unlimited" or int(soft) >= 4_096
    assert not own_broker.running
    assert (own_broker.state_dir / "mosquitto.db").is_file()  # persistence, written on SIGTERM
    assert "Saving in-memory database" in own_broker.log_tail()


def test_a_broker_that_cannot_start_says_why(
    mosquitto: RunningBroker, own_broker: MosquittoProcess, tmp_path: Path, lab_certs: Path
) -> None:
    # Prepare: the session broker's port is taken
    render_config(tmp_path, port=mosquitto.target.port, tls_port=free_ports(1)[0], cert_dir=lab_certs)
    taken = MosquittoProcess(tmp_path, port=mosquitto.target.port)

    # Execute
    with pytest.raises(MosquittoError) as raised:
        taken.start()

    # Assert
    assert "mosquitto exited" in str(raised.value)
    assert "Address already in use" in str(raised.value)  # the tail of mosquitto's own log


def test_bootstrap_is_idempotent_and_sets_the_accounts_password(mosquitto: RunningBroker) -> None:
    # Prepare
    username = new_device_id("cloud")
    first, second = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    bootstrap(mosquitto.admin, cloud_user=username, cloud_password=first)

    # Execute
    bootstrap(mosquitto.admin, cloud_user=username, cloud_password=second)

    # Assert
    with Probe(mosquitto.target.with_credentials(username, first), username) as probe:
        old = probe.connect()
    with Probe(mosquitto.target.with_credentials(username, second), username) as probe:
        new = probe.connect()
        granted = probe.subscribe(device_filter(MessageKind.STATUS, shared_group="g"))
    assert old is not None and old.value == NOT_AUTHORIZED
    assert new is not None and not new.is_failure
    assert granted.value == 1  # still in its role


def test_ensure_service_account_is_idempotent_and_refuses_a_name_outside_the_namespace(
    mosquitto: RunningBroker,
) -> None:
    # Prepare
    name = f"diredi-worker-{secrets.token_hex(3)}"
    first, second = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    ensure_service_account(mosquitto.admin, name, first)

    # Execute
    ensure_service_account(mosquitto.admin, name, second)

    # Assert
    with Probe(mosquitto.target.with_credentials(name, first), name) as probe:
        old = probe.connect()
    with Probe(mosquitto.target.with_credentials(name, second), name) as probe:
        new = probe.connect()
    assert old is not None and old.value == NOT_AUTHORIZED
    assert new is not None and not new.is_failure
    for bad in ("cam-1", "diredi-", "diredi-a b", "diredi-" + "x" * 58):
        with pytest.raises(ValueError, match="service account"):
            ensure_service_account(mosquitto.admin, bad, first)
