"""The artifact download of an update: the cloud API's `GET /api/v1/artifacts/{sha256}` with the
device's Basic credentials, streamed, bounded, checked against the manifest's size, never following a
redirect (it would carry the credentials elsewhere), and cancellable within a tenth of a second even
while the server stalls (a SIGTERM must not wait for a slow network)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import math
import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from device_firmware_py.config import Identity
from device_firmware_py.exceptions import DownloadBusy, DownloadCancelled, DownloadError
from wire import DesiredModel
from wire.errors import shown

CHUNK_BYTES = 64 * 1024
CANCEL_POLL_SECONDS = 0.1
BUSY_ATTEMPTS = 5
MAX_RETRY_AFTER_S = 60.0


@contextlib.contextmanager
def _cancel_watch(sock: socket.socket | None, cancelled: threading.Event) -> Iterator[threading.Event]:
    """Shut the socket down as soon as `cancelled` is set, waking a read blocked on a stalled server."""
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if cancelled.wait(CANCEL_POLL_SECONDS):
                if sock is not None and not done.is_set():
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return

    watcher = threading.Thread(target=watch, name="ota-download-cancel", daemon=True)
    watcher.start()
    try:
        yield done
    finally:
        done.set()
        watcher.join()


def open_connection(
    api_url: str, ca_file: Path | None, timeout: float, client_cert: tuple[Path, Path] | None = None
) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(api_url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise DownloadError(f"api_url {shown(api_url)!r} is not an http(s) URL")
    if parts.scheme == "http":
        if client_cert is not None:
            raise DownloadError("a certificate device downloads over https:// only")
        return http.client.HTTPConnection(parts.hostname, port, timeout=timeout), parts.path
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise DownloadError(f"CA file {ca_file} is unusable: {exc}") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(*client_cert)
        except (OSError, ssl.SSLError) as exc:
            raise DownloadError(f"the device certificate {client_cert[0]} is unusable: {exc}") from None
    connection = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=context)
    return connection, parts.path


def _status_error(status: int, reason: str) -> DownloadError:
    meaning = {
        401: "the device's credentials were refused",
        403: "the device may not download this artifact",
        404: "the artifact is not offered to this device or does not exist",
    }.get(status, "server error" if status >= 500 else "unexpected answer")
    return DownloadError(f"HTTP {status} {shown(reason, 60)}: {meaning}")


def download(
    api_url: str,
    download_path: str,
    *,
    device_id: str,
    identity: Identity,
    expected_size: int,
    max_bytes: int,
    ca_file: Path | None,
    timeout: float,
    cancelled: threading.Event,
) -> bytes:
    """GET `{api_url}{download_path}` as the device (Basic credentials, or its certificate over mutual
    TLS) and return the body.

    Streams in chunks and refuses a body over `min(expected_size, max_bytes)` (by Content-Length or as
    it arrives) or shorter than `expected_size`; HTTP and network errors become DownloadError with the
    reason. Setting `cancelled` stops the download within ~0.1 s, even on a stalled server, with
    DownloadCancelled. Redirects are not followed: they would carry the credentials elsewhere.
    """
    limit = min(expected_size, max_bytes)
    if expected_size > max_bytes:
        raise DownloadError(f"oversized: the artifact has {expected_size} bytes, the limit is {max_bytes}")
    if cancelled.is_set():
        raise DownloadCancelled("download cancelled before it started")
    conn, prefix = open_connection(api_url, ca_file, timeout, identity.certificate)
    headers = {"Accept": "application/octet-stream"}
    if identity.secret is not None:
        token = base64.b64encode(f"{device_id}:{identity.secret}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        conn.connect()
        with _cancel_watch(conn.sock, cancelled):
            conn.request("GET", prefix.rstrip("/") + download_path, headers=headers)
            response = conn.getresponse()
            if response.status in (429, 503):
                raise DownloadBusy(
                    f"HTTP {response.status} {shown(response.reason, 60)}: the server is busy",
                    _retry_after(response.getheader("Retry-After")),
                )
            if response.status != 200:
                raise _status_error(response.status, response.reason)
            return _read_body(response, limit, expected_size, cancelled)
    except (DownloadError, DownloadCancelled):
        raise
    except http.client.IncompleteRead as exc:
        raise DownloadError(f"truncated: the connection closed after {len(exc.partial)} bytes") from None
    except (OSError, http.client.HTTPException) as exc:
        if cancelled.is_set():
            raise DownloadCancelled("download cancelled") from None
        raise DownloadError(f"network error: {type(exc).__name__}: {shown(str(exc))}") from None
    finally:
        conn.close()


def _retry_after(header: str | None) -> float:
    """The wait a Retry-After header asks for (seconds; an HTTP date or garbage counts as 1 s), 1–60 s."""
    try:
        seconds = float(header) if header is not None else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 1.0), MAX_RETRY_AFTER_S) if math.isfinite(seconds) else 1.0


def _read_body(
    response: http.client.HTTPResponse, limit: int, expected_size: int, cancelled: threading.Event
) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise DownloadError(f"oversized: Content-Length {int(declared)} exceeds the expected {limit} bytes")
    body = bytearray()
    while True:
        if cancelled.is_set():
            raise DownloadCancelled(f"download cancelled after {len(body)} bytes")
        chunk = response.read1(CHUNK_BYTES)
        if not chunk:
            break
        body += chunk
        if len(body) > limit:
            raise DownloadError(f"oversized: more than the expected {limit} bytes arrived")
    if cancelled.is_set():  # a shutdown socket reads as end of stream
        raise DownloadCancelled(f"download cancelled after {len(body)} bytes")
    if len(body) < expected_size:
        raise DownloadError(f"truncated: {len(body)} of {expected_size} bytes arrived")
    return bytes(body)


def http_fetcher(
    api_url: str,
    *,
    device_id: str,
    identity: Identity,
    max_bytes: int,
    ca_file: Path | None,
    timeout: float,
    cancelled: threading.Event,
) -> Callable[[DesiredModel], bytes]:
    """The `fetch` an Updater needs: download the document's artifact from the cloud's API. A busy
    answer (429 or 503: the front limits each address, and many devices may share one behind a NAT)
    is tried again after the wait it asks for, with jitter, `BUSY_ATTEMPTS` times in all."""

    def fetch(desired: DesiredModel) -> bytes:
        for attempt in range(1, BUSY_ATTEMPTS + 1):
            try:
                return download(
                    api_url,
                    desired.download_path,
                    device_id=device_id,
                    identity=identity,
                    expected_size=desired.manifest.size,
                    max_bytes=max_bytes,
                    ca_file=ca_file,
                    timeout=timeout,
                    cancelled=cancelled,
                )
            except DownloadBusy as exc:
                if attempt == BUSY_ATTEMPTS:
                    raise
                wait = exc.retry_after * random.uniform(1.0, 1.5)  # noqa: S311 (jitter, not secrecy)
                if cancelled.wait(wait):
                    raise DownloadCancelled("download cancelled while waiting to try again") from None
        raise AssertionError("unreachable")

    return fetch
