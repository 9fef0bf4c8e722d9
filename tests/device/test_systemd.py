"""The device's systemd unit passes `systemd-analyze verify`, and the daemon speaks sd_notify."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from device_firmware_py.systemd import Notifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "diredi-device.service"
INSTALLED = "/opt/diredi-device/bin/diredi-device"


def verify(unit_text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of `unit_text`, with ExecStart pointing at this checkout's command (the
    unit names the installed one, which verify requires to exist)."""
    command = Path(sys.executable).parent / "diredi-device"
    path = directory / "diredi-device.service"
    path.write_text(unit_text.replace(INSTALLED, str(command)))
    return subprocess.run(  # noqa: S603
        [str(shutil.which("systemd-analyze")), "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_unit_verifies_cleanly(tmp_path: Path) -> None:
    # Execute
    result = verify(UNIT.read_text(), tmp_path)

    # Assert: verify exits 0 even for unknown keys, so its output must be empty too
    assert result.returncode == 0 and result.stdout + result.stderr == ""


def test_a_broken_unit_is_flagged(tmp_path: Path) -> None:
    # Execute
    result = verify(UNIT.read_text().replace("Type=notify", "Type=notifyy"), tmp_path)

    # Assert
    assert "Failed to parse service type" in result.stderr


def test_the_unit_is_hardened_and_restarts_on_failure_only() -> None:
    # Prepare
    lines = {
        line.split("=", 1)[0]: line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if "=" in line
    }

    # Assert
    assert lines["Type"] == "notify" and int(lines["WatchdogSec"]) > 0
    assert lines["Restart"] == "on-failure" and "78" in lines["RestartPreventExitStatus"].split()
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert lines[key] == "yes"
    assert lines["ProtectSystem"] == "strict" and lines["StateDirectory"] == "diredi-device"
    assert lines["User"] == "diredi-device"


def test_the_notifier_sends_ready_watchdog_and_stopping() -> None:
    # Prepare: a datagram socket standing in for systemd's, as $NOTIFY_SOCKET names it
    directory = Path(tempfile.mkdtemp(dir="/tmp"))
    path = directory / "notify"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    manager.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})

    # Execute
    notifier.ready("serving m1")
    notifier.watchdog()
    notifier.watchdog()  # within the interval: not sent again
    notifier.stopping()

    # Assert
    received = [manager.recv(4096).decode() for _ in range(3)]
    assert received == ["READY=1\nSTATUS=serving m1", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]
    assert notifier.watchdog_interval == pytest.approx(1.0)
    notifier.close()
    manager.close()
    shutil.rmtree(directory)


def test_without_systemd_the_notifier_does_nothing() -> None:
    # Execute
    notifier = Notifier({})
    notifier.ready("x")
    notifier.watchdog()

    # Assert
    assert not notifier.enabled and notifier.watchdog_interval is None
