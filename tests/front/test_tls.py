"""The front's TLS listener: the API over TLS 1.2 and 1.3 with the lab certificate, nothing older."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.front.nginx import Front, get, needs_nginx

pytestmark = needs_nginx


def test_the_api_answers_over_tls_verified_against_the_lab_ca(front: Front) -> None:
    # Execute
    answer = get(front.tls_port, "/healthz", tls=front.tls())

    # Assert
    assert (answer.status, answer.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_are_accepted(front: Front, version: ssl.TLSVersion) -> None:
    # Prepare
    context = front.tls()
    context.minimum_version = context.maximum_version = version

    # Execute
    with socket.create_connection(("127.0.0.1", front.tls_port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            negotiated = sock.version()

    # Assert
    assert negotiated == version.name.replace("_", ".")


def test_the_api_sees_https_and_the_clients_host_and_port(front: Front) -> None:
    # Execute: a path with a trailing slash, which the API redirects to the one without
    answer = get(front.tls_port, "/api/v1/devices/", tls=front.tls())

    # Assert: the redirect it builds names the scheme and port the client used (X-Forwarded-Proto, Host)
    assert answer.status == 307
    assert answer.headers["Location"] == f"https://127.0.0.1:{front.tls_port}/api/v1/devices"


def _tls_1_1(ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # TLS 1.1's ciphers are below the default level
    return context


@contextmanager
def tls_1_1_server(certs: Path) -> Iterator[int]:
    """A Python TLS server on loopback that speaks TLS 1.1 only, for one handshake: its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                with context.wrap_socket(connection, server_side=True):
                    pass
            except OSError:
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        thread.join(30)


def test_tls_1_1_is_refused(front: Front, lab_certs: Path) -> None:
    # Prepare: this machine's OpenSSL must be able to speak TLS 1.1 at all for the check to mean anything
    try:
        with (
            tls_1_1_server(lab_certs) as port,
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ):
            with _tls_1_1(front.ca).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                assert sock.version() == "TLSv1.1"
    except (ssl.SSLError, ValueError) as exc:
        pytest.skip(f"the local OpenSSL cannot handshake TLS 1.1 even with itself: {exc}")

    # Execute
    with socket.create_connection(("127.0.0.1", front.tls_port), timeout=30) as raw:
        with pytest.raises(ssl.SSLError) as refused:
            _tls_1_1(front.ca).wrap_socket(raw, server_hostname="127.0.0.1")

    # Assert: the server said no (a protocol-version alert), not the client
    assert refused.value.reason in {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"}, refused.value
