"""The device's own key for certificate identity: made once on the device, owner-only, reused; its CSR
names the device; a key file others can read or that is not a key is refused."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker.client import BrokerTarget
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
