"""Fixtures for the device tests: artifact servers (HTTP and HTTPS), a v2 artifact and the cloud's keys."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cloud.signing import KeyRing
from tests.device.artifacts import ArtifactServer, make_ring, make_v2, running_server

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData
    from cloud.ml.export import EdgeArtifact
    from cloud.ml.line import EdgeLine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def artifact_server() -> Iterator[ArtifactServer]:
    """A fresh plain-HTTP artifact server."""
    with running_server() as state:
        yield state


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lab CA and a server certificate for 127.0.0.1, made by the project's own broker/certs.sh."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run(
        [str(ROOT / "broker" / "certs.sh"), str(directory)], check=True, capture_output=True, timeout=60
    )
    return directory


@pytest.fixture
def tls_server(certs: Path) -> Iterator[ArtifactServer]:
    """A fresh HTTPS artifact server whose certificate chains to `certs`/ca.crt."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    with running_server(context) as state:
        yield state


@pytest.fixture(scope="session")
def v2(base_line: EdgeLine, small_data: ScenarioData) -> EdgeArtifact:
    """Version 2 of the base line (see make_v2), built once for all device tests."""
    return make_v2(base_line, small_data)


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    """The cloud's real signing keys."""
    return make_ring(tmp_path_factory.mktemp("keys"))
