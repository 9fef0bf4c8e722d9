"""The fleet benchmark on a small fleet: password and certificate devices side by side, every phase, and
a device the fleet CA did not certify refused by the TLS handshake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bench import fleet_connections
from bench.device_swarm import Swarm, connected
from bench.mqtt_lab import lab, provision_certificates
from broker.exceptions import MosquittoError
from broker.mosquitto import find_binary, find_plugin
from cloud.fleet_ca import FleetCA
from device_firmware_py.identity import device_key, signing_request
from tests.databases import postgres_admin_url

DEVICES = 20


@pytest.fixture(scope="module")
def admin_url() -> str:
    """The test PostgreSQL server (skips without one), on a machine with mosquitto (skips without)."""
    try:
        find_binary("mosquitto")
        find_plugin()
    except MosquittoError as exc:
        pytest.skip(f"no mosquitto here: {exc}")
    return postgres_admin_url()


@pytest.fixture(scope="module")
def report(admin_url: str) -> dict[str, Any]:
    """The benchmark, both identities, on a small fleet (half a minute: two brokers, registries, ingests)."""
    return fleet_connections.run(admin_url, count=DEVICES, heartbeat_s=2.0, periods=1.0, qos=1)


def test_one_run_reports_both_identities_side_by_side_with_their_ratios(report: dict[str, Any]) -> None:
    assert report["identities"] == ["password", "certificate"]
    for identity, listener in (("password", "TLS"), ("certificate", "mutual TLS")):
        result = report[identity]
        assert result["listener"] == listener
        assert result["connect"]["connected"] == DEVICES
        assert (result["connect"]["failures"], result["connect"]["handshake_failures"]) == (0, 0)
        assert result["connect"]["tls"].startswith("TLS")
        assert result["connect"]["connack_ms_p99"] >= result["connect"]["connack_ms_p50"] > 0
        assert result["connect"]["broker_cpu_s"] > 0
        assert result["steady"]["online"] == DEVICES
        assert result["steady"]["telemetry_ok"]
        assert result["drop"]["dropped_offline"] == result["drop"]["dropped"] == DEVICES // 2
        assert result["drop"]["kept_online"] == DEVICES // 2
    assert set(report["certificate"]["provision_seconds"]) == {
        "keys",
        "certificates",
        "files",
        "registry",
        "clients",
    }
    assert set(report["certificate_over_password"]) == set(fleet_connections.RATIOS)
    assert report["certificate_over_password"]["connect_s"] > 0


def test_the_table_puts_the_identities_and_their_ratio_in_columns(report: dict[str, Any]) -> None:
    # Prepare
    console = Console(record=True, width=300)

    # Execute
    fleet_connections.print_table(report, console)

    # Assert
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "figure" in line)
    assert [column.strip() for column in header.strip("┃ ").split("┃")] == [
        "figure",
        "password",
        "certificate",
        "certificate / password",
        "ok",
    ]
    connect_all = next(line for line in lines if "connect all" in line)
    assert connect_all.count(" s ") == 2 and "×" in connect_all
    assert not [line for line in lines if "NO (" in line]


def test_a_device_another_ca_certified_is_refused_by_the_handshake(admin_url: str, short_dir: Path) -> None:
    # Prepare
    stranger_ca = FleetCA.open(short_dir / "other-ca")
    key = device_key(short_dir)
    (short_dir / "stranger.crt").write_text(
        stranger_ca.issue(signing_request(key, "fleet-99999"), "fleet-99999").pem
    )
    with lab(admin_url, devices="certificate") as bench_lab:
        assert bench_lab.tls_target is not None
        made = provision_certificates(bench_lab, ["fleet-00000", "fleet-00001"], cohort="fleet")
        stranger = {"fleet-99999": (short_dir / "stranger.crt", short_dir / "identity.key")}
        swarm = Swarm(bench_lab.tls_target, {}, certificates=made.files | stranger)
        try:
            # Execute
            swarm.connect_all(timeout=30)

            # Assert
            assert sorted(d.device_id for d in connected(swarm.devices)) == ["fleet-00000", "fleet-00001"]
            refused = {d.device_id: d.refused for d in swarm.devices if d.refused}
            assert list(refused) == ["fleet-99999"]
            assert swarm.counters.handshake_failures == 1
        finally:
            swarm.close()
