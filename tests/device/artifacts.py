"""Shared OTA test helpers: a real HTTP(S) artifact server, a v2 artifact, keys, signed documents."""

from __future__ import annotations

import base64
import contextlib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud.signing import KeyRing
from wire import ArtifactManifest

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData
    from cloud.ml.export import EdgeArtifact
    from cloud.ml.line import EdgeLine

DEVICE = "cam-01"
SECRET = "device-secret-0123"  # noqa: S105 - the test server's device credential
T0 = datetime(2030, 1, 1, tzinfo=UTC)
MAX_BYTES = 8 * 1024 * 1024


# --- a real artifact server ---------------------------------------------------------------------


@dataclass
class Route:
    """What the server answers for one path: a body and how it misbehaves."""

    body: bytes
    mode: str = "ok"  # ok | truncate | claim_more | no_length | slow | stall | redirect | status | busy
    status: int = 200
    busy: int = 0  # busy: answer 429 (Retry-After: 1) this many times, then serve the body


@dataclass
class ArtifactServer:
    """A threaded HTTP server that checks the device's Basic credentials and serves routes."""

    url: str
    routes: dict[str, Route] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    requests: list[str] = field(default_factory=list)

    def offer(self, artifact: EdgeArtifact, body: bytes | None = None, mode: str = "ok") -> None:
        """Serve `body` (default: the artifact's bytes) at the artifact's download path."""
        path = f"/api/v1/artifacts/{artifact.manifest.sha256}"
        self.routes[path] = Route(artifact.model if body is None else body, mode)


def handler_for(server: ArtifactServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `server`'s routes, accepting only DEVICE:SECRET."""
    expected_auth = "Basic " + base64.b64encode(f"{DEVICE}:{SECRET}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
            pass

        def do_GET(self) -> None:
            server.requests.append(self.path)
            if self.headers.get("Authorization") != expected_auth:
                self.send_error(401)
                return
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            if route.mode == "status":
                self.send_error(route.status)
                return
            if route.mode == "busy" and route.busy > 0:
                route.busy -= 1
                self.send_response(429)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if route.mode == "redirect":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.end_headers()
                return
            body = route.body
            self.send_response(200)
            length = {"ok": len(body), "busy": len(body), "truncate": len(body), "claim_more": 10**9}.get(
                route.mode
            )
            if route.mode in ("slow", "stall"):
                length = len(body)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            if route.mode == "truncate":
                self.wfile.write(body[: len(body) // 2])
            elif route.mode == "slow":
                for start in range(0, len(body), 512):
                    if server.stop.wait(0.05):
                        return
                    self.wfile.write(body[start : start + 512])
                    self.wfile.flush()
            elif route.mode == "stall":
                self.wfile.write(body[:100])
                self.wfile.flush()
                server.stop.wait(30)
            elif route.mode != "claim_more":
                self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def running_server(tls: ssl.SSLContext | None = None) -> Iterator[ArtifactServer]:
    """An artifact server on 127.0.0.1, over TLS with `tls`; stopped (stalled responses too) on exit."""
    state = ArtifactServer(url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    scheme = "https" if tls is not None else "http"
    state.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        httpd.shutdown()
        httpd.server_close()


# --- artifacts, keys and documents --------------------------------------------------------------


def make_v2(base_line: EdgeLine, small_data: ScenarioData) -> EdgeArtifact:
    """Version 2 of the base line: the same student re-exported with other calibration data."""
    from cloud.ml.export import export_int8

    artifact = export_int8(
        base_line.student, small_data.train.x[256:], model_id="base.v2", line="base", version=2
    )
    assert artifact.manifest.sha256 != base_line.artifact.manifest.sha256
    return artifact


def make_ring(directory: Path) -> KeyRing:
    """The cloud's real signing keys, kept in `directory`."""
    return KeyRing.open(directory)


def signed(
    ring: KeyRing,
    manifest: ArtifactManifest,
    minutes: int,
    *,
    device_id: str = DEVICE,
    rollback_of: str | None = None,
) -> bytes:
    """A DesiredModel signed by `ring`, issued `minutes` after T0, as received on `model/desired`."""
    document = ring.sign_desired(
        device_id=device_id,
        manifest=manifest,
        rollback_of=rollback_of,
        issued_at=T0 + timedelta(minutes=minutes),
    )
    return document.to_json().encode()
