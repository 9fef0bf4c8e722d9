"""The daemon's configuration: a valid file loads; every wrong one is refused with the key named, and
the command line exits with the code systemd does not restart on."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from device_firmware_py.config import ExitCode, Identity, load_config, prepare_state_dir, read_secret, to_toml
from device_firmware_py.config import write_config as write_device_config
from device_firmware_py.exceptions import ConfigError

KEY = base64.b64encode(bytes(range(32))).decode()


def write_config(tmp_path: Path, text: str | None = None, **replace: str) -> Path:
    """A valid configuration (or `text`), with lines replaced by key."""
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text("s3cret-token\n")
        secret.chmod(0o600)
    document = text or (
        'device_id = "cam-kitchen-1"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[broker]\n"
        'url = "mqtt://127.0.0.1:1883"\n'
        "[credentials]\n"
        f'file = "{secret}"\n'
        "[api]\n"
        'url = "http://127.0.0.1:8000"\n'
        "[trust]\n"
        f'"0123456789abcdef" = "{KEY}"\n'
        "[input]\n"
        'source = "simulated"\n'
        f'path = "{tmp_path / "stream.npz"}"\n'
    )
    for key, line in replace.items():
        lines = document.splitlines()
        document = "\n".join(line if old.split("=")[0].strip() == key else old for old in lines) + "\n"
    path = tmp_path / "device.toml"
    path.write_text(document)
    return path


def test_a_valid_configuration_loads_with_defaults(tmp_path: Path) -> None:
    # Prepare
    path = write_config(tmp_path)

    # Execute
    config = load_config(path)

    # Assert
    assert config.device_id == "cam-kitchen-1"
    assert config.trusted_keys() == {"0123456789abcdef": bytes(range(32))}
    assert config.rd.min_samples == 20 and config.status.interval_s == 10
    assert config.broker_target(Identity(secret="s3cret")).username == "cam-kitchen-1"  # noqa: S106


@pytest.mark.parametrize(
    ("replace", "named"),
    [
        ({"device_id": 'device_id = "Cam_1"'}, "device_id"),
        ({"url": 'url = "http://127.0.0.1:1883"'}, "broker.url"),
        ({"source": 'source = "camera"'}, "input.source"),
        ({"state_dir": "state_dir = 3"}, "state_dir"),
        ({'"0123456789abcdef"': '"0123456789abcdef" = "bm90IGEga2V5"'}, "trust"),
        ({'"0123456789abcdef"': '"not-a-key-id" = "x"'}, "trust"),
    ],
)
def test_a_wrong_value_is_refused_naming_its_key(tmp_path: Path, replace: dict[str, str], named: str) -> None:
    # Prepare
    path = write_config(tmp_path, **replace)

    # Execute / Assert
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(path)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"device_id = \n", "not valid TOML"),
        (b"\xff\xfe garbage", "not UTF-8"),
        (b"", "device_id"),
        (b"x" * 70_000, "at most"),
    ],
)
def test_garbage_files_are_refused_clearly(tmp_path: Path, content: bytes, says: str) -> None:
    # Prepare
    path = tmp_path / "device.toml"
    path.write_bytes(content)

    # Execute / Assert
    with pytest.raises(ConfigError, match=says):
        load_config(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "nowhere.toml")


def test_an_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    # Prepare
    path = write_config(tmp_path, "surprise = 1\n" + write_config(tmp_path).read_text())

    # Execute / Assert
    with pytest.raises(ConfigError, match="surprise"):
        load_config(path)


def test_dp_needs_a_budget(tmp_path: Path) -> None:
    # Prepare
    text = write_config(tmp_path).read_text() + "[rd]\nepsilon = 2.0\n"
    path = write_config(tmp_path, text)

    # Execute / Assert
    with pytest.raises(ConfigError, match="budget_epsilon"):
        load_config(path)


@pytest.mark.parametrize(
    ("key", "line", "says"),
    [
        ("url", 'url = "mqtt://broker.example:1883"', "broker.url: plain mqtt:// to broker.example"),
        ("url", 'url = "http://fleet.example"', "api.url: plain http:// to fleet.example"),
        ("url", 'url = "mqtt://10.0.0.7:1883"', "broker.url: plain mqtt:// to 10.0.0.7"),
    ],
)
def test_plaintext_to_a_remote_host_is_refused(tmp_path: Path, key: str, line: str, says: str) -> None:
    # Prepare: replace the broker's or the API's URL (both lines are `url = ...`)
    document = write_config(tmp_path).read_text()
    old = 'url = "mqtt://127.0.0.1:1883"' if "mqtt" in line else 'url = "http://127.0.0.1:8000"'
    path = write_config(tmp_path, document.replace(old, line))

    # Execute / Assert
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        load_config(path)
    lab = write_config(tmp_path, "allow_plaintext = true\n" + document.replace(old, line))
    assert load_config(lab).allow_plaintext


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"])
def test_plaintext_to_loopback_is_allowed(tmp_path: Path, host: str) -> None:
    document = write_config(tmp_path).read_text().replace("127.0.0.1", host)
    assert load_config(write_config(tmp_path, document)).broker.url.startswith(f"mqtt://{host}")


def test_a_secret_others_can_read_is_refused(tmp_path: Path) -> None:
    # Prepare
    config = load_config(write_config(tmp_path))
    secret = config.credentials.file
    assert secret is not None
    secret.chmod(0o644)

    # Execute / Assert
    with pytest.raises(ConfigError, match="chmod 600"):
        read_secret(config)
    secret.chmod(0o600)
    assert read_secret(config) == "s3cret-token"


def test_a_secret_file_with_more_than_the_secret_is_refused(tmp_path: Path) -> None:
    # Prepare
    config = load_config(write_config(tmp_path))
    secret = config.credentials.file
    assert secret is not None
    secret.write_text("two words\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match="alone, on one line"):
        read_secret(config)


def test_the_state_dir_is_made_owner_only_and_an_open_one_refused(tmp_path: Path) -> None:
    # Prepare
    config = load_config(write_config(tmp_path))

    # Execute
    made = prepare_state_dir(config)

    # Assert
    assert made.stat().st_mode & 0o777 == 0o700
    made.chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        prepare_state_dir(config)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "device_firmware_py", *args], capture_output=True, text=True, timeout=60
    )


def test_the_command_line_exits_78_on_a_wrong_configuration(tmp_path: Path) -> None:
    # Prepare
    path = write_config(tmp_path, source='source = "camera"')

    # Execute
    wrong = run_cli("check", "--config", str(path))
    fine = run_cli("check", "--config", str(write_config(tmp_path)))
    usage = run_cli("run")

    # Assert
    assert wrong.returncode == ExitCode.CONFIG and "input.source" in wrong.stderr
    assert fine.returncode == ExitCode.OK, fine.stderr
    assert usage.returncode == ExitCode.USAGE and "--config" in usage.stderr


def test_the_one_writer_writes_what_load_config_reads_back(tmp_path: Path) -> None:
    # Prepare: configurations with every section, with and without local DP
    loaded = load_config(write_config(tmp_path))
    text = write_config(tmp_path).read_text() + "[rd]\nepsilon = 2.0\nbudget_epsilon = 8.0\n"
    with_dp = load_config(write_config(tmp_path, text))

    # Execute
    written = [write_device_config(tmp_path / f"again-{i}.toml", c) for i, c in enumerate((loaded, with_dp))]

    # Assert
    assert [load_config(path) for path in written] == [loaded, with_dp]
    assert to_toml(loaded).startswith('device_id = "cam-kitchen-1"\n')
