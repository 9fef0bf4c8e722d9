"""The device's own key for certificate identity: made once on the device, owner-only, reused; its CSR
names the device; a key file others can read or that is not a key is refused."""

from __future__ import annotations

import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker.client import BrokerTarget
from cloud.fleet_ca import FleetCA
from device_firmware_py.config import load_config, read_identity
from device_firmware_py.exceptions import ConfigError
from device_firmware_py.exitcodes import ExitCode
from device_firmware_py.identity import KEY_FILE, device_key, signing_request
from tests.device.daemons import write_config
from tests.device.test_config import KEY


def test_the_key_is_made_once_owner_only_and_its_request_names_the_device(tmp_path: Path) -> None:
    # Execute
    first = device_key(tmp_path)
    again = device_key(tmp_path)
    request = x509.load_pem_x509_csr(signing_request(first, "cam-0001").encode())

    # Assert
    assert first.private_numbers() == again.private_numbers()
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert request.is_signature_valid and request.public_key() == first.public_key()
    assert request.subject.rfc4514_string() == "CN=cam-0001"
    assert isinstance(first.curve, ec.SECP256R1)


@pytest.mark.parametrize(
    ("content", "mode", "says"),
    [
        (None, 0o644, "open to others"),
        (b"not a key\n", 0o600, "not a PEM private key"),
        (b"", 0o600, "not a PEM private key"),
    ],
    ids=["readable by others", "garbage", "empty"],
)
def test_a_key_file_that_cannot_be_trusted_is_refused(
    tmp_path: Path, content: bytes | None, mode: int, says: str
) -> None:
    # Prepare
    path = tmp_path / KEY_FILE
    if content is None:
        device_key(tmp_path)
    else:
        path.write_bytes(content)
    path.chmod(mode)

    # Execute / Assert
    with pytest.raises(ConfigError, match=says):
        device_key(tmp_path)


def test_diredi_device_csr_prints_the_request_and_keeps_the_key_on_the_device(tmp_path: Path) -> None:
    # Prepare
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    broker = BrokerTarget(host="127.0.0.1", port=1883)  # not contacted
    config = write_config(
        tmp_path, broker, "cam-0001", "secret", inbox, trust={"0123456789abcdef": KEY}, source="directory"
    )
    command = [sys.executable, "-m", "device_firmware_py", "csr", "--config", str(config)]

    # Execute
    first = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    second = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603

    # Assert: the same key both times, and it stays in the state directory
    assert first.returncode == ExitCode.OK, first.stderr
    requests = [x509.load_pem_x509_csr(r.stdout.encode()) for r in (first, second)]
    assert requests[0].public_key() == requests[1].public_key()
    assert "PRIVATE KEY" not in first.stdout
    assert (tmp_path / "state" / KEY_FILE).exists()


@pytest.fixture
def certificate_device(tmp_path: Path) -> tuple[Path, FleetCA]:
    """A certificate device's configuration (mqtts://, its key made) and the CA that is to certify it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    device_key(state)
    broker = BrokerTarget(host="127.0.0.1", port=8883, tls=True)  # not contacted
    config = write_config(
        tmp_path,
        broker,
        "cam-0001",
        "unused",
        tmp_path,
        trust={"0123456789abcdef": KEY},
        certificate=tmp_path / "device.pem",
    )
    return config, FleetCA.open(tmp_path / "ca")


def test_a_certificate_device_logs_in_with_its_certificate_and_no_password(
    certificate_device: tuple[Path, FleetCA],
) -> None:
    # Prepare: the CA certifies the device's request
    path, ca = certificate_device
    config = load_config(path)
    key = device_key(config.state_dir)
    issued = ca.issue(signing_request(key, "cam-0001"), "cam-0001")
    (path.parent / "device.pem").write_text(issued.pem)

    # Execute
    identity = read_identity(config)
    target = config.broker_target(identity)

    # Assert
    assert identity.secret is None and identity.certificate == (
        path.parent / "device.pem",
        config.state_dir / KEY_FILE,
    )
    assert target.client_cert == identity.certificate and target.username is None and target.password is None


@pytest.mark.parametrize("case", ["garbage", "another key", "another device", "expired", "no key"])
def test_a_certificate_the_device_cannot_log_in_with_is_refused_at_start(
    certificate_device: tuple[Path, FleetCA], case: str
) -> None:
    # Prepare
    path, ca = certificate_device
    config = load_config(path)
    own = device_key(config.state_dir)
    other = ec.generate_private_key(ec.SECP256R1())
    if case == "garbage":
        pem = "not a certificate\n"
    elif case == "another key":
        pem = ca.issue(signing_request(other, "cam-0001"), "cam-0001").pem
    elif case == "another device":
        pem = ca.issue(signing_request(own, "cam-0002"), "cam-0002").pem
    elif case == "expired":
        past = datetime.now(UTC) - timedelta(days=3)
        pem = ca.issue(signing_request(own, "cam-0001"), "cam-0001", days=1, now=past).pem
    else:
        pem = ca.issue(signing_request(own, "cam-0001"), "cam-0001").pem
    (path.parent / "device.pem").write_text(pem)
    if case == "no key":
        (config.state_dir / KEY_FILE).unlink()
    expected = {
        "garbage": "not a PEM certificate",
        "another key": "certifies another key",
        "another device": "names cam-0002, not cam-0001",
        "expired": "expired on",
        "no key": "diredi-device csr",
    }[case]

    # Execute / Assert
    with pytest.raises(ConfigError, match=expected):
        read_identity(config)


@pytest.mark.parametrize(
    ("credentials", "url", "expected"),
    [
        ('file = "/s"\ncertificate = "/c"', "mqtts://127.0.0.1:8883", "not both"),
        ("", "mqtts://127.0.0.1:8883", "not both"),
        ('certificate = "/c"', "mqtt://127.0.0.1:1883", "use mqtts://"),
    ],
)
def test_credentials_that_name_no_one_kind_or_a_certificate_without_tls_are_refused(
    tmp_path: Path, credentials: str, url: str, expected: str
) -> None:
    # Prepare
    text = (
        f'device_id = "cam-0001"\nstate_dir = "{tmp_path}"\n[broker]\nurl = "{url}"\n'
        f'[credentials]\n{credentials}\n[api]\nurl = "https://fleet.example"\n'
        f'[trust]\n"0123456789abcdef" = "{KEY}"\n[input]\nsource = "simulated"\npath = "/x.npz"\n'
    )
    (tmp_path / "device.toml").write_text(text)

    # Execute / Assert
    with pytest.raises(ConfigError, match=expected):
        load_config(tmp_path / "device.toml")
