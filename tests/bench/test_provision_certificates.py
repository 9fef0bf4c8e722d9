"""The provisioning benchmark's quick run on a real mosquitto, PostgreSQL and API: certificate devices
leave the broker's state files as they were, password devices grow them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import provision_certificates
from broker.exceptions import MosquittoError
from broker.mosquitto import DYNSEC_NAME, find_binary, find_plugin
from tests.databases import postgres_admin_url

PHASE_KEYS = {
    "devices",
    "seconds",
    "per_s",
    "p50_ms",
    "p99_ms",
    "failures",
    "broker_before",
    "broker_after",
    "rss_delta_mb",
    "state_bytes_delta",
    "state_files_unchanged",
    "extrapolated_2000_s",
}


@pytest.fixture
def services() -> None:
    """Skips the test where mosquitto or the test PostgreSQL is missing."""
    postgres_admin_url()
    try:
        find_binary("mosquitto")
        find_binary("mosquitto_ctrl")
        find_plugin()
    except MosquittoError as exc:
        pytest.skip(f"no mosquitto here: {exc}")


@pytest.mark.usefixtures("services")
def test_certificate_devices_leave_the_brokers_state_files_as_they_were(tmp_path: Path) -> None:
    # Execute
    provision_certificates.main(["--quick", "--out", str(tmp_path / "report.json")])

    # Assert
    report = json.loads((tmp_path / "report.json").read_text())
    certificate, password = report["certificate"], report["password"]
    assert {"key_generation", "admitted", "reference", "ok", "quick", "cpus", "machine"} <= report.keys()
    assert PHASE_KEYS <= certificate.keys() and PHASE_KEYS <= password.keys()
    assert (certificate["devices"], certificate["failures"]) == (200, 0)
    assert (password["devices"], password["failures"]) == (50, 0)
    assert certificate["state_files_unchanged"]
    assert certificate["state_bytes_delta"] == dict.fromkeys(provision_certificates.STATE_FILES, 0)
    files_before, files_after = certificate["broker_before"]["files"], certificate["broker_after"]["files"]
    assert files_before[DYNSEC_NAME] == files_after[DYNSEC_NAME]  # the same bytes: no device in it
    assert report["admitted"] == {"checked": 2, "connected": 2}
    # The same reading sees the password devices' clients and roles written into the broker's file.
    assert password["state_bytes_delta"][DYNSEC_NAME] > 0
