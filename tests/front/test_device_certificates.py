"""Certificate devices download through the front with their certificate (mutual TLS): nginx verifies it
against the fleet CA and hands it to the API with the secret they share; the API finds the device by it.
A revoked device, another CA's certificate, and a certificate header that did not come from the front
are all refused."""

from __future__ import annotations

import secrets
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from cloud.artifacts import LocalArtifactStore
from cloud.fleet_ca import FleetCA
from cloud.registry import migrate
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.devices import Certificate, provision_certificate_device, revoke_device
from device_firmware_py.config import Identity
from device_firmware_py.download import download
from device_firmware_py.exceptions import DownloadError
from device_firmware_py.identity import device_key, signing_request
from tests.cloud.factories import make_cloud_model, make_cohort, make_edge_model
from tests.front.nginx import Front, UvicornProcess, needs_nginx, running_front, started_api

pytestmark = needs_nginx


@dataclass
class Fleet:
    front: Front
    api_port: int
    ca: FleetCA
    sha256: str  # the artifact offered to the devices
    size: int
    devices: dict[str, tuple[Path, Path]]  # device id -> its certificate and key
    certificates: dict[str, str]  # device id -> its certificate, PEM


@pytest.fixture(scope="module")
def fleet(open_files: int, lab_certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The API (with its front secret) behind a front that asks for device certificates, and a registry
    with two certificate devices (one to be revoked) that are offered an edge model."""
    directory = tmp_path_factory.mktemp("device-front")
    secret = secrets.token_urlsafe(32)
    ca = FleetCA.open(directory / "ca")
    url = f"sqlite:///{directory / 'registry.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    store = LocalArtifactStore(directory / "data" / "artifacts")
    devices, certificates = {}, {}
    with transaction(session_factory(engine)) as session:
        make_cohort(session)
        teacher = make_cloud_model(session, store)
        model = make_edge_model(session, store, teacher_id=teacher.id)
        sha256, size = model.sha256, model.size
        for device_id in ("cam-0001", "cam-0002"):
            (directory / device_id).mkdir()
            issued = ca.issue(signing_request(device_key(directory / device_id), device_id), device_id)
            device = provision_certificate_device(
                session,
                device_id=device_id,
                cohort_id="kitchen",
                certificate=Certificate(issued.serial, issued.sha256, issued.not_after),
            )
            device.desired_model_id = model.id
            (directory / device_id / "cert.pem").write_text(issued.pem)
            devices[device_id] = (directory / device_id / "cert.pem", directory / device_id / "identity.key")
            certificates[device_id] = issued.pem
    engine.dispose()
    process: UvicornProcess = started_api(directory, env={"DIREDI_FRONT_SECRET": secret})
    port = process.port
    try:
        with running_front(
            directory / "front", upstream_port=port, certs=lab_certs, device_ca=ca.directory / "ca.pem",
            front_secret=secret,
        ) as front:  # fmt: skip
            yield Fleet(front, port, ca, sha256, size, devices, certificates)
    finally:
        process.stop()


def fetch(fleet: Fleet, identity: Identity, device_id: str = "cam-0001") -> bytes:
    return download(
        f"https://127.0.0.1:{fleet.front.tls_port}",
        f"/api/v1/artifacts/{fleet.sha256}",
        device_id=device_id,
        identity=identity,
        expected_size=fleet.size,
        max_bytes=1 << 20,
        ca_file=fleet.front.ca,
        timeout=30,
        cancelled=threading.Event(),
    )


def test_a_certificate_device_downloads_what_it_is_offered_with_its_certificate(fleet: Fleet) -> None:
    # Execute
    body = fetch(fleet, Identity(certificate=fleet.devices["cam-0001"]))

    # Assert
    assert len(body) == fleet.size


def test_another_cas_certificate_is_refused_by_the_front(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: a certificate for the same id from another CA
    stranger = FleetCA.open(tmp_path / "other-ca")
    issued = stranger.issue(signing_request(device_key(tmp_path), "cam-0001"), "cam-0001")
    (tmp_path / "cert.pem").write_text(issued.pem)

    # Execute / Assert
    with pytest.raises(DownloadError, match="HTTP 400"):
        fetch(fleet, Identity(certificate=(tmp_path / "cert.pem", tmp_path / "identity.key")))


def test_a_certificate_header_is_believed_only_from_the_front(fleet: Fleet) -> None:
    # Prepare: a device's certificate is public; sent as the header, past the front or through it
    forged = {"X-Device-Certificate": quote(fleet.certificates["cam-0001"], safe="")}
    path = f"/api/v1/artifacts/{fleet.sha256}"
    context = ssl.create_default_context(cafile=str(fleet.front.ca))

    # Execute
    direct = httpx.get(f"http://127.0.0.1:{fleet.api_port}{path}", headers=forged, timeout=30)
    guessed = httpx.get(
        f"http://127.0.0.1:{fleet.api_port}{path}",
        headers=forged | {"X-Diredi-Front": "not-the-secret"},
        timeout=30,
    )
    through = httpx.get(f"https://127.0.0.1:{fleet.front.tls_port}{path}", headers=forged, verify=context)

    # Assert: the front drops the header of a client that presented no certificate
    assert (direct.status_code, guessed.status_code, through.status_code) == (401, 401, 401)


def test_a_revoked_device_is_refused_at_once(fleet: Fleet) -> None:
    # Prepare
    engine = make_engine(f"sqlite:///{fleet.ca.directory.parent / 'registry.db'}")
    with transaction(session_factory(engine)) as session:
        revoke_device(session, "cam-0002")
    engine.dispose()

    # Execute / Assert: the front still verifies the certificate; the API finds the device revoked
    with pytest.raises(DownloadError, match="HTTP 401"):
        fetch(fleet, Identity(certificate=fleet.devices["cam-0002"]), "cam-0002")
