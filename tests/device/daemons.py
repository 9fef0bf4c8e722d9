"""What the daemon tests share: a configuration file for a test device, and the daemon as a real
process (`python -m device_firmware_py run`) that a test can SIGTERM or SIGKILL and read the log of."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from broker.client import BrokerTarget
from device_firmware_py.config import DeviceConfig
from device_firmware_py.config import write_config as write_device_config
from device_firmware_py.daemon import STATE_FILES
from device_firmware_py.ota import ModelSlots
from tests.polling import wait_until

__all__ = ["DaemonProcess", "install_model", "wait_until", "write_config", "write_stream"]

REPORT_LOGGED = re.compile(r"knowledge report ([0-9a-f-]{36}) from")
RECEIPT_LOGGED = re.compile(r"receipt for ([0-9a-f-]{36}): delivered")


def write_config(
    directory: Path,
    broker: BrokerTarget,
    device_id: str,
    secret: str,
    stream: Path,
    *,
    trust: dict[str, str],
    trust_version: int = 0,
    trust_threshold: int = 1,
    api_url: str = "http://127.0.0.1:9",
    rate_hz: float = 200,
    feedback_every: int = 1,
    new_samples: int = 0,
    resend_after_s: float = 1,
    name: str = "device.toml",
    rd: dict[str, float] | None = None,
    source: str = "simulated",
    certificate: Path | None = None,
) -> Path:
    """A device configuration `directory/name` (its state under `directory/state`), with its secret
    file, or with `certificate` a certificate device's; `rd` adds settings to its [rd] section (epsilon,
    budget_epsilon, schedule_s...); with `source="directory"`, `stream` is the directory its inputs are
    dropped into."""
    secret_file = directory / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    credentials = {"file": secret_file} if certificate is None else {"certificate": certificate}
    broker_settings: dict[str, Any] = {
        "url": f"{'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}",
        "keepalive_s": 10,
    }
    if broker.ca_file is not None:
        broker_settings["ca_file"] = broker.ca_file
    config = DeviceConfig.model_validate(
        {
            "device_id": device_id,
            "state_dir": directory / "state",
            "trust_version": trust_version,
            "trust_threshold": trust_threshold,
            "broker": broker_settings,
            "credentials": credentials,
            "api": {"url": api_url, "timeout_s": 10},
            "trust": trust,
            "input": {"source": source, "path": stream, "rate_hz": rate_hz, "feedback_every": feedback_every},
            "rd": {"min_samples": 20, "new_samples": new_samples, **(rd or {})},
            "status": {"interval_s": 1},
            "spool": {"resend_after_s": resend_after_s},
        }
    )
    return write_device_config(directory / name, config)


def install_model(directory: Path, model: bytes, manifest: Any) -> None:
    """Put a model in the device's active slot, as a finished earlier update would have."""
    state = directory / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    slots = ModelSlots(state / STATE_FILES["models"])
    slots.stage(model, manifest)
    slots.switch()


def write_stream(path: Path, inputs: np.ndarray, labels: np.ndarray) -> Path:
    """A simulated user's stream file."""
    np.savez(path, inputs=inputs, labels=labels)
    return path


class DaemonProcess:
    """`diredi-device run --config` as a child process, its log (stderr) kept across restarts."""

    def __init__(self, config: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_dir = log_dir
        self.env = env  # None: this process's
        self.runs = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, config: Path | None = None) -> DaemonProcess:
        """Start it (again), optionally with another configuration file."""
        self.runs += 1
        if config is not None:
            self.config = config
        with (self.log_dir / f"daemon-{self.runs}.log").open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "device_firmware_py", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def log(self) -> str:
        """Every run's log, in order."""
        return "".join(
            (self.log_dir / f"daemon-{n}.log").read_text(errors="replace") for n in range(1, self.runs + 1)
        )

    def reports(self) -> set[uuid.UUID]:
        """The knowledge reports it spooled, by msg_id."""
        return {uuid.UUID(m) for m in REPORT_LOGGED.findall(self.log())}

    def receipted(self) -> set[uuid.UUID]:
        """The reports and acks whose receipt it took off its spool."""
        return {uuid.UUID(m) for m in RECEIPT_LOGGED.findall(self.log())}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, as systemd stops it; its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(
                f"the daemon did not stop within {timeout} s of SIGTERM:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])
