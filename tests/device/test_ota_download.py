"""device_firmware_py.download against a real HTTP(S) artifact server: Basic device credentials,
bad bodies, HTTP and network errors, TLS verification and prompt cancellation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from device_firmware_py.config import Identity
from device_firmware_py.download import download, http_fetcher
from device_firmware_py.exceptions import DownloadCancelled, DownloadError
from tests.device.artifacts import DEVICE, MAX_BYTES, SECRET, ArtifactServer, Route
from wire import DesiredModel

if TYPE_CHECKING:
    from cloud.ml.export import EdgeArtifact


def fetch_bytes(
    server: ArtifactServer,
    artifact: EdgeArtifact,
    cancelled: threading.Event | None = None,
    ca_file: Path | None = None,
) -> bytes:
    """Download `artifact` from `server` as the device would."""
    return download(
        server.url,
        f"/api/v1/artifacts/{artifact.manifest.sha256}",
        device_id=DEVICE,
        identity=Identity(secret=SECRET),
        expected_size=artifact.manifest.size,
        max_bytes=MAX_BYTES,
        ca_file=ca_file,
        timeout=10.0,
        cancelled=cancelled or threading.Event(),
    )


def test_download_returns_the_artifact_with_device_credentials(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare
    artifact_server.offer(v2)

    # Execute
    body = fetch_bytes(artifact_server, v2)

    # Assert
    assert body == v2.model
    assert artifact_server.requests == [f"/api/v1/artifacts/{v2.manifest.sha256}"]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("truncate", r"truncated: \d+ of \d+ bytes arrived"),
        ("claim_more", "oversized: Content-Length 1000000000 exceeds"),
        ("no_length", "oversized: more than the expected"),
        ("redirect", "HTTP 302"),
    ],
)
def test_download_refuses_a_bad_body(
    artifact_server: ArtifactServer, v2: EdgeArtifact, mode: str, reason: str
) -> None:
    # Prepare: no_length streams the artifact and more, with no Content-Length to refuse up front
    body = v2.model + b"\0" * 100_000 if mode == "no_length" else v2.model
    artifact_server.offer(v2, body, mode)

    # Execute / Assert
    with pytest.raises(DownloadError, match=reason):
        fetch_bytes(artifact_server, v2)


def test_download_refuses_a_body_shorter_than_the_manifest(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare: a well-formed response that simply holds too few bytes
    artifact_server.offer(v2, v2.model[:-10])

    # Execute / Assert
    with pytest.raises(
        DownloadError, match=f"truncated: {v2.manifest.size - 10} of {v2.manifest.size} bytes"
    ):
        fetch_bytes(artifact_server, v2)


def test_download_refuses_an_artifact_larger_than_max_bytes(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare
    artifact_server.offer(v2)

    # Execute / Assert
    with pytest.raises(DownloadError, match="oversized: the artifact has"):
        download(
            artifact_server.url,
            f"/api/v1/artifacts/{v2.manifest.sha256}",
            device_id=DEVICE,
            identity=Identity(secret=SECRET),
            expected_size=v2.manifest.size,
            max_bytes=v2.manifest.size - 1,
            ca_file=None,
            timeout=10.0,
            cancelled=threading.Event(),
        )
    assert artifact_server.requests == []  # refused before connecting


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (404, "HTTP 404 .*not offered"),
        (403, "HTTP 403 .*may not download"),
        (500, "HTTP 500 .*server error"),
        (503, "HTTP 503 .*busy"),
        (429, "HTTP 429 .*busy"),
    ],
)
def test_download_maps_http_errors(
    artifact_server: ArtifactServer, v2: EdgeArtifact, status: int, reason: str
) -> None:
    # Prepare
    if status != 404:
        artifact_server.routes[f"/api/v1/artifacts/{v2.manifest.sha256}"] = Route(b"", "status", status)

    # Execute / Assert
    with pytest.raises(DownloadError, match=reason):
        fetch_bytes(artifact_server, v2)


def fetcher(server: ArtifactServer, cancelled: threading.Event) -> Callable[[DesiredModel], bytes]:
    """The daemon's fetch (with its retries) from `server`."""
    return http_fetcher(
        server.url,
        device_id=DEVICE,
        identity=Identity(secret=SECRET),
        max_bytes=MAX_BYTES,
        ca_file=None,
        timeout=10.0,
        cancelled=cancelled,
    )


def signed_document(artifact: EdgeArtifact) -> DesiredModel:
    """A desired model naming `artifact` (the fetch reads only its path and size; nothing verifies it)."""
    return DesiredModel(
        device_id=DEVICE,
        manifest=artifact.manifest,
        download_path=f"/api/v1/artifacts/{artifact.manifest.sha256}",
        key_id="0123456789abcdef",
    )


def test_a_busy_server_is_tried_again_after_the_wait_it_asks_for(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare: the front answers 429 twice (many devices behind one address), then serves
    path = f"/api/v1/artifacts/{v2.manifest.sha256}"
    artifact_server.routes[path] = Route(v2.model, "busy", busy=2)
    fetch = fetcher(artifact_server, threading.Event())

    # Execute
    started = time.monotonic()
    body = fetch(signed_document(v2))

    # Assert: three requests, and at least the two seconds the server asked for
    assert body == v2.model
    assert artifact_server.requests == [path] * 3
    assert time.monotonic() - started >= 2.0


def test_a_server_busy_for_longer_fails_the_download_and_cancelling_stops_the_wait(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare
    path = f"/api/v1/artifacts/{v2.manifest.sha256}"
    artifact_server.routes[path] = Route(v2.model, "busy", busy=1000)
    cancelled = threading.Event()
    fetch = fetcher(artifact_server, cancelled)
    threading.Timer(0.3, cancelled.set).start()

    # Execute / Assert: the wait between attempts ends as soon as the daemon stops
    started = time.monotonic()
    with pytest.raises(DownloadCancelled, match="waiting to try again"):
        fetch(signed_document(v2))
    assert time.monotonic() - started < 1.0


def test_download_with_wrong_credentials_is_unauthorized(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare
    artifact_server.offer(v2)

    # Execute / Assert
    with pytest.raises(DownloadError, match="HTTP 401 .*credentials were refused"):
        download(
            artifact_server.url,
            f"/api/v1/artifacts/{v2.manifest.sha256}",
            device_id=DEVICE,
            identity=Identity(secret="wrong-secret"),  # noqa: S106 - deliberately not the device's
            expected_size=v2.manifest.size,
            max_bytes=MAX_BYTES,
            ca_file=None,
            timeout=10.0,
            cancelled=threading.Event(),
        )


def test_download_from_an_unreachable_server_is_a_network_error(
    artifact_server: ArtifactServer, v2: EdgeArtifact
) -> None:
    # Prepare: a port nobody listens on
    artifact_server.url = "http://127.0.0.1:9"

    # Execute / Assert
    with pytest.raises(DownloadError, match="network error: ConnectionRefusedError"):
        fetch_bytes(artifact_server, v2)


@pytest.mark.parametrize("mode", ["slow", "stall"])
def test_cancelling_stops_a_download_promptly(
    artifact_server: ArtifactServer, v2: EdgeArtifact, mode: str
) -> None:
    # Prepare: `slow` trickles 512 B every 50 ms (minutes for the artifact); `stall` sends 100 B, then nothing
    artifact_server.offer(v2, mode=mode)
    cancelled = threading.Event()
    threading.Timer(0.3, cancelled.set).start()
    started = time.monotonic()

    # Execute / Assert
    with pytest.raises(DownloadCancelled):
        fetch_bytes(artifact_server, v2, cancelled)
    assert time.monotonic() - started < 2.0


def test_download_over_tls_verifies_the_server_against_the_ca_file(
    tls_server: ArtifactServer, certs: Path, v2: EdgeArtifact
) -> None:
    # Prepare
    tls_server.offer(v2)

    # Execute
    body = fetch_bytes(tls_server, v2, ca_file=certs / "ca.crt")

    # Assert
    assert body == v2.model
    with pytest.raises(DownloadError, match="network error: SSLCertVerificationError"):
        fetch_bytes(tls_server, v2)  # the system's CAs do not know the lab CA


def test_cancelling_stops_a_stalled_tls_download(
    tls_server: ArtifactServer, certs: Path, v2: EdgeArtifact
) -> None:
    # Prepare
    tls_server.offer(v2, mode="stall")
    cancelled = threading.Event()
    threading.Timer(0.3, cancelled.set).start()
    started = time.monotonic()

    # Execute / Assert
    with pytest.raises(DownloadCancelled):
        fetch_bytes(tls_server, v2, cancelled, ca_file=certs / "ca.crt")
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("url", ["ftp://127.0.0.1", "http://127.0.0.1:port", "not a url"])
def test_download_refuses_a_url_it_cannot_use(v2: EdgeArtifact, url: str) -> None:
    # Prepare
    server = ArtifactServer(url=url)

    # Execute / Assert
    with pytest.raises(DownloadError, match="is not an http\\(s\\) URL"):
        fetch_bytes(server, v2)
