"""`diredi-device feedback add`: the user's labelled input goes into the private store on the
device; a bad file or label is refused with a clear message and the sysexits code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from broker.client import BrokerTarget
from device_firmware_py.daemon import STATE_FILES
from device_firmware_py.exitcodes import ExitCode
from device_firmware_py.feedback import FeedbackStore
from tests.device.daemons import install_model, write_config, write_stream
from tests.device.test_config import KEY

TRUST = {"0123456789abcdef": KEY}


def feedback_add(config: Path, label: str, file: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "device_firmware_py", "feedback", "add", "--config", str(config)]
    return subprocess.run(  # noqa: S603
        [*command, "--label", label, str(file)], capture_output=True, text=True, timeout=120
    )


def device(tmp_path: Path, small_data: Any) -> Path:
    pool = small_data.users[0].device_train[0]
    stream = write_stream(tmp_path / "stream.npz", pool.x[:5], pool.y[:5])
    broker = BrokerTarget(host="127.0.0.1", port=1883)  # not contacted: feedback stays on the device
    return write_config(tmp_path, broker, "cam-kitchen-1", "secret", stream, trust=TRUST)


def test_feedback_is_stored_privately_on_the_device(tmp_path: Path, base_line: Any, small_data: Any) -> None:
    # Prepare
    config = device(tmp_path, small_data)
    install_model(tmp_path, base_line.artifact.model, base_line.artifact.manifest)
    sample = tmp_path / "sample.npy"
    np.save(sample, small_data.users[0].device_train[0].x[0])

    # Execute
    first = feedback_add(config, "8", sample)
    second = feedback_add(config, "3", sample)

    # Assert
    assert first.returncode == ExitCode.OK, first.stderr
    assert "2 labelled samples" in second.stdout
    directory = tmp_path / "state" / STATE_FILES["feedback"]
    assert directory.stat().st_mode & 0o777 == 0o700
    shape = tuple(base_line.artifact.manifest.input.shape[1:])
    with FeedbackStore(directory, input_shape=shape, num_classes=10) as store:
        _, labels = store.samples()
    assert labels.tolist() == [8, 3]


def test_bad_feedback_is_refused_with_a_clear_error(tmp_path: Path, base_line: Any, small_data: Any) -> None:
    # Prepare
    config = device(tmp_path, small_data)
    install_model(tmp_path, base_line.artifact.model, base_line.artifact.manifest)
    wrong_shape, garbage = tmp_path / "wrong.npy", tmp_path / "garbage.npy"
    np.save(wrong_shape, np.zeros((3, 3)))
    garbage.write_bytes(b"not an array at all")
    good = tmp_path / "good.npy"
    np.save(good, small_data.users[0].device_train[0].x[0])

    # Execute
    results = [
        feedback_add(config, "8", wrong_shape),
        feedback_add(config, "8", garbage),
        feedback_add(config, "10", good),  # the model has classes 0-9
        feedback_add(config, "eight", good),
        feedback_add(config, "8", tmp_path / "missing.npy"),
    ]

    # Assert
    codes = [r.returncode for r in results]
    assert codes == [ExitCode.DATA, ExitCode.DATA, ExitCode.DATA, ExitCode.USAGE, ExitCode.DATA]
    assert all(r.stderr.strip() for r in results)
    assert "shape" in results[0].stderr


def test_feedback_before_any_model_is_installed_is_refused(tmp_path: Path, small_data: Any) -> None:
    # Prepare
    config = device(tmp_path, small_data)
    sample = tmp_path / "sample.npy"
    np.save(sample, small_data.users[0].device_train[0].x[0])

    # Execute
    result = feedback_add(config, "8", sample)

    # Assert
    assert result.returncode == ExitCode.CONFIG and "no model is installed yet" in result.stderr


def test_a_state_dir_too_long_for_the_feedback_socket_stops_the_daemon_at_start(
    tmp_path: Path, small_data: Any
) -> None:
    # Prepare: a device whose state directory leaves no room for a Unix socket's path
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    config = device(deep, small_data)

    # Execute
    command = [sys.executable, "-m", "device_firmware_py", "run", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)  # noqa: S603

    # Assert: a configuration error that says what to change, before the daemon connects or serves
    assert result.returncode == ExitCode.CONFIG
    assert "feedback socket" in result.stderr and "shorter state_dir" in result.stderr
