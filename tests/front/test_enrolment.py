"""Enrolment by claim through the front: a device image's claim certificate obtains the device's own
certificate for a pre-registered serial at once, and for another serial once an operator approves it;
the claim reaches nothing but the enrolment route, and cannot take over an enrolled serial."""

from __future__ import annotations

import secrets
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cloud.fleet_ca import CLAIM_CA_NAME, FleetCA
from cloud.registry import apikeys, migrate
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.tables import Role
from device_firmware_py.config import DeviceConfig, Identity
from device_firmware_py.enrol import enrol
from device_firmware_py.exceptions import EnrolmentError
from tests.cloud.factories import make_cohort
from tests.front.nginx import Front, needs_nginx, running_front, started_api

pytestmark = needs_nginx

KEY = "A" * 43 + "="  # a trusted key's shape; these devices verify no document


@dataclass
class Cloud:
    front: Front
    operator: dict[str, str]
    claim: tuple[Path, Path]  # the batch's claim certificate and key, as an image holds them
    work: Path

    def api(self, method: str, path: str, **request: object) -> httpx.Response:
        context = ssl.create_default_context(cafile=str(self.front.ca))
        url = f"https://127.0.0.1:{self.front.tls_port}/api/v1{path}"
        return httpx.request(method, url, headers=self.operator, verify=context, timeout=30, **request)  # type: ignore[arg-type]

    def device(self, serial: str, poll_s: float = 1) -> DeviceConfig:
        """A device image for `serial`: the claim, no certificate of its own yet."""
        directory = self.work / serial
        return DeviceConfig.model_validate(
            {
                "device_id": serial,
                "state_dir": directory / "state",
                "broker": {"url": "mqtts://127.0.0.1:8883"},  # not contacted
                "credentials": {"certificate": directory / "device.pem"},
                "api": {"url": f"https://127.0.0.1:{self.front.tls_port}", "ca_file": self.front.ca},
                "trust": {"0123456789abcdef": KEY},
                "input": {"source": "simulated", "path": directory / "stream.npz"},
                "enrolment": {
                    "claim_certificate": self.claim[0],
                    "claim_key": self.claim[1],
                    "poll_s": poll_s,
                },
            }
        )


@pytest.fixture(scope="module")
def cloud(open_files: int, lab_certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """The API behind a front that takes device and claim certificates; a cohort, an operator's key, and
    a claim for batch b1."""
    directory = tmp_path_factory.mktemp("enrolment")
    secret = secrets.token_urlsafe(32)
    fleet_ca = FleetCA.open(directory / "fleet-ca")
    claim_ca = FleetCA.open(directory / "claim-ca", name=CLAIM_CA_NAME)
    key, issued = claim_ca.issue_claim("b1")
    (directory / "claim.key").write_bytes(key)
    (directory / "claim.key").chmod(0o600)
    (directory / "claim.pem").write_text(issued.pem)
    engine = make_engine(f"sqlite:///{directory / 'registry.db'}")
    migrate.upgrade(engine)
    with transaction(session_factory(engine)) as session:
        make_cohort(session)
        _, operator_key = apikeys.create_key(session, role=Role.operator, name="enrolment test")
    engine.dispose()
    env = {
        "DIREDI_FRONT_SECRET": secret,
        "DIREDI_FLEET_CA_DIR": str(fleet_ca.directory),
        "DIREDI_CLAIM_CA_DIR": str(claim_ca.directory),
    }
    process = started_api(directory, env=env)
    port = process.port
    try:
        with running_front(
            directory / "front",
            upstream_port=port,
            certs=lab_certs,
            device_ca=fleet_ca.directory / "ca.pem",
            front_secret=secret,
            claim_ca=claim_ca.directory / "ca.pem",
        ) as front:
            yield Cloud(
                front,
                {"Authorization": f"Bearer {operator_key}"},
                (directory / "claim.pem", directory / "claim.key"),
                directory,
            )
    finally:
        process.stop()


def test_a_pre_registered_serial_is_enrolled_at_once_and_its_certificate_works(cloud: Cloud) -> None:
    # Prepare
    added = cloud.api("POST", "/enrolments", json={"serial": "cam-0001", "cohort_id": "kitchen"})
    config = cloud.device("cam-0001")

    # Execute
    certificate = enrol(config, threading.Event(), timeout_s=10)
    shown = cloud.api("GET", "/devices/cam-0001").json()
    listed = cloud.api("GET", "/enrolments", params={"state": "enrolled"}).json()

    # Assert: the device exists with its certificate, which the front and the API take as the device
    assert added.status_code == 201, added.text
    assert certificate.exists() and shown["cohort_id"] == "kitchen" and shown["cert_sha256"]
    assert [e["serial"] for e in listed["items"]] == ["cam-0001"] and listed["items"][0]["batch"] == "b1"
    assert_known_as_device(cloud, (certificate, config.state_dir / "identity.key"))


def assert_known_as_device(cloud: Cloud, identity: tuple[Path, Path]) -> None:
    from device_firmware_py.download import download

    with pytest.raises(Exception, match="HTTP 404"):  # authenticated as the device: nothing offered
        download(
            f"https://127.0.0.1:{cloud.front.tls_port}",
            "/api/v1/artifacts/" + "ab" * 32,
            device_id="cam-0001",
            identity=Identity(certificate=identity),
            expected_size=1,
            max_bytes=1,
            ca_file=cloud.front.ca,
            timeout=30,
            cancelled=threading.Event(),
        )


def test_an_unknown_serial_waits_for_an_operator_and_is_enrolled_once_approved(cloud: Cloud) -> None:
    # Prepare: the device asks in the background and waits
    config = cloud.device("cam-0002", poll_s=1)
    done: list[Path | Exception] = []
    stopping = threading.Event()

    def device() -> None:
        try:
            done.append(enrol(config, stopping, timeout_s=60))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            done.append(exc)

    thread = threading.Thread(target=device)
    thread.start()
    try:
        # Execute: the operator sees the request and approves it
        pending: list[dict[str, object]] = []
        for _ in range(100):
            pending = cloud.api("GET", "/enrolments", params={"state": "pending"}).json()["items"]
            if pending:
                break
            stopping.wait(0.2)
        approved = cloud.api("POST", "/enrolments/cam-0002/approve", json={"cohort_id": "kitchen"})
        thread.join(timeout=30)
    finally:
        stopping.set()
        thread.join()

    # Assert
    assert [p["serial"] for p in pending] == ["cam-0002"] and approved.status_code == 200, approved.text
    assert len(done) == 1 and isinstance(done[0], Path) and done[0].exists(), done


def test_the_claim_reaches_nothing_but_enrolment_and_cannot_take_over_an_enrolled_serial(
    cloud: Cloud,
) -> None:
    # Prepare: cam-0003 enrolled; then another image of the batch asks for the same serial
    cloud.api("POST", "/enrolments", json={"serial": "cam-0003", "cohort_id": "kitchen"})
    enrol(cloud.device("cam-0003"), threading.Event(), timeout_s=10)
    thief = cloud.device("cam-0003")
    thief = thief.model_copy(update={"state_dir": cloud.work / "thief" / "state"})
    context = ssl.create_default_context(cafile=str(cloud.front.ca))
    context.load_cert_chain(*cloud.claim)
    base = f"https://127.0.0.1:{cloud.front.tls_port}/api/v1"

    # Execute
    with pytest.raises(EnrolmentError, match="HTTP 409"):
        enrol(thief, threading.Event(), timeout_s=10)
    elsewhere = {
        path: httpx.get(base + path, verify=context, timeout=30).status_code
        for path in ("/devices", "/enrolments", "/artifacts/" + "ab" * 32)
    }
    refused = cloud.api("POST", "/enrolments/cam-0004/refuse")

    # Assert: 403 on every other route; an unknown serial cannot be refused before it asks
    assert elsewhere == {"/devices": 403, "/enrolments": 403, "/artifacts/" + "ab" * 32: 403}
    assert refused.status_code == 404
