"""The whole loop end to end, as `diredi demo` runs it, on the production services: mosquitto, Redis,
PostgreSQL, a Celery worker, the ingest, the API and one real device daemon (a process) per user of the
two-user scenario. Plus the demo command's refusals of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr

from cloud.children import free_ports
from cloud.demo import DemoOptions, DemoResult, DeviceRun, demo_settings, device_config, run_demo
from cloud.settings import Settings
from device_firmware_py.config import load_config
from tests.brokers import running_mosquitto
from tests.conftest import SCENARIOS
from tests.databases import postgres_admin_url
from tests.redis_server import running_redis
from testsupport.postgres import scratch_database

DIREDI = Path(sys.executable).with_name("diredi")
TWO_USERS = SCENARIOS / "digits-two-users.json"


@pytest.mark.slow
def test_the_whole_loop_on_mosquitto_redis_and_postgresql(tmp_path: Path, short_dir: Path) -> None:
    # Prepare
    with (
        running_mosquitto(tmp_path / "mosquitto") as broker,
        scratch_database(postgres_admin_url(), prefix="diredi_e2e") as database_url,
        running_redis(tmp_path / "redis") as redis_url,
    ):
        configured = Settings(
            mqtt_url=SecretStr(broker.cloud.url()),
            mqtt_admin_url=SecretStr(broker.admin.url()),
            database_url=database_url,
            redis_url=redis_url,
        )
        (api_port,) = free_ports(1)

        # Execute
        result = run_demo(
            demo_settings(short_dir / "data", configured),  # the devices' sockets are under it
            TWO_USERS,
            api_port=api_port,
            mqtt_port=broker.target.port,
            options=DemoOptions(timeout_s=1500),
        )

    # Assert: each device ends on its cohort's new model and measured it better on its held-out samples
    assert [d.user for d in result.devices] == ["alice", "bob"]
    for device in result.devices:
        assert (device.outcome, device.v1, device.v2) == (
            "approved",
            f"{device.user}-home.v1",
            f"{device.user}-home.v2",
        ), device.reason
        assert device.acc_v1 is not None and device.acc_v2 is not None
        # `diredi sim` measures +0.07 to +0.13 on these users' worlds; a device measures its own stream
        assert device.acc_v2 - device.acc_v1 >= 0.04, (device.acc_v1, device.acc_v2)
        assert device.windows_v2 >= DemoOptions().after_windows
        assert device.knowledge_bytes is not None and device.knowledge_bytes < 10_000
        assert any("—consumed→ job rd_cycle" in line for line in device.lineage)
        assert any(f"{device.device_id} —runs→ {device.v2}" in line for line in device.lineage)
    json.dumps(result.as_dict(), default=str)  # what --out writes


def test_a_device_configuration_the_demo_writes_is_one_the_daemon_loads(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "secret").chmod(0o600)

    # Execute
    path = device_config(
        tmp_path,
        device_id="alice-cam-1",
        broker_url="mqtt://127.0.0.1:1883?protocol=3.1.1",
        api_url="http://127.0.0.1:8000",
        trusted_keys={"0123456789abcdef": "A" * 43 + "="},
        trust_version=3,
        stream=tmp_path / "stream.npz",
        rate_hz=50,
        new_samples=120,
        status_interval_s=2,
    )

    # Assert
    config = load_config(path)
    assert (config.device_id, config.input.rate_hz, config.rd.new_samples) == ("alice-cam-1", 50, 120)
    assert config.trust_version == 3
    assert tomllib.loads(path.read_text())["input"]["source"] == "simulated"


def test_the_results_are_json_without_the_daemon_process(tmp_path: Path) -> None:
    device = DeviceRun("alice", {"3": 8}, "alice-home", "alice-cam-1", "alice-home.v1", tmp_path)
    device.process = subprocess.Popen(["true"])
    device.process.wait()
    result = DemoResult("s.json", [device], "http://h/docs", {"ingest": 1}, str(tmp_path), {}, 1.0)
    written = json.loads(json.dumps(result.as_dict()))
    assert written["devices"][0]["device_id"] == "alice-cam-1" and "process" not in written["devices"][0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--scenario", "nowhere.json"], "nowhere.json"),
        (["--out", "results.txt"], ".json"),
        (["--out", "no/such/dir/r.json"], "existing directory"),
        (["--api-port", "70000"], "--api-port"),
        (["--data-dir", "{full}"], "new or empty directory"),
    ],
)
def test_bad_demo_options_are_refused_before_anything_starts(
    tmp_path: Path, args: list[str], says: str
) -> None:
    # Prepare
    full = tmp_path / "full"
    full.mkdir()
    (full / "registry.db").write_text("someone's")
    args = [a.replace("{full}", str(full)) for a in args]

    # Execute
    done = subprocess.run(
        [str(DIREDI), "demo", "--scenario", str(TWO_USERS), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "DIREDI_DATA_DIR": str(tmp_path / "d")},
    )

    # Assert
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stdout + done.stderr
    assert (full / "registry.db").read_text() == "someone's"
