"""The fleet CA: device certificates from the device's own CSR (CN = the device id, client authentication
only), refusals for requests it must not sign, and a CRL that a real TLS server checks."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud.exceptions import InvalidValueError, SigningError
from cloud.fleet_ca import FleetCA
from device_firmware_py import identity as device_identity

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.open(tmp_path / "keys" / "ca")


def device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_of(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, common_name: str | None) -> bytes:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    request = (
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names)).sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


# --- the CA itself ----------------------------------------------------------------------------------------


def test_the_ca_is_made_once_owner_only_and_opened_again_as_it_was(tmp_path: Path) -> None:
    # Execute
    first = FleetCA.open(tmp_path / "ca")
    again = FleetCA.open(tmp_path / "ca")

    # Assert
    assert first.certificate == again.certificate
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    constraints = first.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and first.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")


def test_a_ca_key_others_can_read_or_that_is_not_its_certificates_is_refused(tmp_path: Path) -> None:
    # Prepare
    FleetCA.open(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").chmod(0o644)

    # Execute / Assert
    with pytest.raises(SigningError, match="open to others"):
        FleetCA.open(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").chmod(0o600)
    FleetCA.open(tmp_path / "other")
    (tmp_path / "ca" / "ca.pem").write_bytes((tmp_path / "other" / "ca.pem").read_bytes())
    with pytest.raises(SigningError, match="ca.key is not the key of ca.pem"):
        FleetCA.open(tmp_path / "ca")


# --- issuing ---------------------------------------------------------------------------------------------


def test_a_device_certificate_certifies_the_devices_own_key_for_client_authentication(ca: FleetCA) -> None:
    # Prepare
    key = device_key()

    # Execute
    issued = ca.issue(csr_of(key, "cam-0001"), "cam-0001", now=NOW)
    unnamed = ca.issue(csr_of(device_key(), None), "cam-0002", now=NOW)

    # Assert: signed by the CA, the device's key, CN = the id, not a CA, for client auth only
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "CN=cam-0001"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (cert.serial_number, cert.not_valid_after_utc) == (issued.serial, issued.not_after)
    assert issued.not_after == NOW + timedelta(days=365)
    assert len(issued.sha256) == 64 and issued.serial != unnamed.serial
    assert x509.load_pem_x509_certificate(unnamed.pem.encode()).subject.rfc4514_string() == "CN=cam-0002"


def test_the_request_a_device_makes_is_certified(ca: FleetCA, tmp_path: Path) -> None:
    key = device_identity.device_key(tmp_path)

    issued = ca.issue(device_identity.signing_request(key, "cam-0001"), "cam-0001")

    assert x509.load_pem_x509_certificate(issued.pem.encode()).public_key() == key.public_key()


def tampered(csr: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    request = x509.load_der_x509_csr(bytes(der))
    return request.public_bytes(serialization.Encoding.PEM)


BAD_REQUESTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "not a PEM certificate signing request"),
    "garbage": (lambda: b"\x00\xff" * 100, "not a PEM certificate signing request"),
    "a certificate, not a request": (
        lambda: b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "not a PEM certificate signing request",
    ),
    "too long": (lambda: b"A" * 9000, "at most 8192"),
    "another device's name": (
        lambda: csr_of(device_key(), "cam-0002"),
        "names 'cam-0002', not device 'cam-0001'",
    ),
    "a bad signature": (lambda: tampered(csr_of(device_key(), "cam-0001")), "signature does not verify"),
    "a weak RSA key": (
        lambda: csr_of(rsa.generate_private_key(public_exponent=65537, key_size=1024), "cam-0001"),  # noqa: S505
        "1024 bits",
    ),
    "an unusual curve": (lambda: csr_of(ec.generate_private_key(ec.SECP256K1()), "cam-0001"), "secp256k1"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_a_request_the_ca_must_not_sign_is_refused_with_the_reason(ca: FleetCA, case: str) -> None:
    make, says = BAD_REQUESTS[case]
    with pytest.raises(InvalidValueError, match=says):
        ca.issue(make(), "cam-0001")


@pytest.mark.parametrize("device_id", ["CAM 1", "$SYS", "x", "cam/0001"])
def test_a_name_that_is_not_a_device_id_is_refused(ca: FleetCA, device_id: str) -> None:
    with pytest.raises(InvalidValueError, match="not a device id"):
        ca.issue(csr_of(device_key(), None), device_id)


# --- a real TLS handshake, with and without revocation ------------------------------------------------


@pytest.fixture
def server_cert(ca: FleetCA, tmp_path: Path) -> tuple[Path, Path]:
    """A server key and certificate (made here, not by the fleet CA: only clients are the CA's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.now(UTC) - timedelta(days=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """One TLS handshake on loopback; the CN the server saw, or the server's error."""
    outcome: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            peer, _ = listener.accept()
            try:
                with server.wrap_socket(peer, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    seen = x509.load_der_x509_certificate(der).subject
                    outcome.append(str(seen.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value))
            except (ssl.SSLError, OSError) as exc:
                outcome.append(f"refused: {exc}")

        thread = threading.Thread(target=serve)
        thread.start()
        with socket.create_connection(listener.getsockname()) as raw, client.wrap_socket(raw) as tls:
            try:
                tls.recv(1)
            except (ssl.SSLError, OSError):
                pass
        thread.join(10)
    return outcome[0]


@pytest.fixture
def device_files(ca: FleetCA, tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    key = device_key()
    issued = ca.issue(csr_of(key, "cam-0001"), "cam-0001")
    cert_path, key_path = tmp_path / "device.pem", tmp_path / "device.key"
    cert_path.write_text(issued.pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    yield cert_path, key_path, issued.serial


def contexts(
    ca: FleetCA, server_cert: tuple[Path, Path], device: tuple[Path, Path], crl: Path | None
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*server_cert)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cadata=ca.certificate_pem)
    if crl is not None:
        server.load_verify_locations(cafile=str(crl))
        server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(server_cert[0]))
    client.check_hostname = False
    client.load_cert_chain(*device)
    return server, client


def test_a_tls_server_that_trusts_the_ca_admits_the_device_until_its_certificate_is_revoked(
    ca: FleetCA, server_cert: tuple[Path, Path], device_files: tuple[Path, Path, int]
) -> None:
    # Prepare
    cert_path, key_path, serial = device_files
    crl_before = ca.write_crl([])
    admitted = handshake(*contexts(ca, server_cert, (cert_path, key_path), crl_before))

    # Execute
    crl = ca.write_crl([(serial, datetime.now(UTC))])
    refused = handshake(*contexts(ca, server_cert, (cert_path, key_path), crl))

    # Assert
    assert admitted == "cam-0001"
    assert refused.startswith("refused:") and "revoked" in refused
    listed = x509.load_pem_x509_crl(crl.read_bytes())
    assert listed.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert [r.serial_number for r in listed] == [serial]
    assert listed.next_update_utc is not None and listed.next_update_utc > datetime.now(UTC) + timedelta(
        days=7
    )
