"""The front's fixtures: the real API (`diredi api`, uvicorn, 1,024 descriptors) and nginx rendered by
cloud/front.py in front of it, with a TLS and a plain listener on free loopback ports."""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.front.nginx import (
    CERTS_SCRIPT,
    Front,
    UvicornProcess,
    raise_open_files,
    running_front,
    started_api,
)

# Descriptors this process (and so nginx, if it cannot raise its own limit) may hold: 1,100 half-open
# connections and the rest.
OPEN_FILES = 16384


@pytest.fixture(scope="package")
def open_files() -> Iterator[int]:
    """This process's soft descriptor limit, raised for the package's tests (nginx inherits it)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield raise_open_files(OPEN_FILES)
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.fixture(scope="package")
def lab_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """broker/certs.sh's lab CA and server certificate (SAN localhost, 127.0.0.1)."""
    certs = tmp_path_factory.mktemp("front-certs")
    subprocess.run([str(CERTS_SCRIPT), str(certs)], check=True, capture_output=True, timeout=60)
    return certs


@pytest.fixture(scope="package")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornProcess]:
    """`diredi api` on a free loopback port (`.port`), on a migrated SQLite registry of its own."""
    process = started_api(tmp_path_factory.mktemp("front-api"))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="package")
def front(
    open_files: int, lab_certs: Path, api: UvicornProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Front]:
    """The front in front of the API, shared by the package's tests."""
    with running_front(
        tmp_path_factory.mktemp("front"),
        upstream_port=api.port,
        certs=lab_certs,
    ) as running:
        yield running
