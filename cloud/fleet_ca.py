"""The fleet CA: it certifies each device's own key from the device's certificate signing request, so the
private key never leaves the device, and lists what it revoked in a CRL that the broker reloads.

A device certificate names the device in its subject's common name (CN = the device id): a broker that
takes the CN as the MQTT username (mosquitto's `use_identity_as_username`, EMQX's
`peer_cert_as_username = cn`) authorises every device with one pattern rule over that name, and holds
no state per device (docs/broker.md).

Layout of the CA's directory (owner-only; `<key directory>/ca` by default): `ca.key` (PKCS#8 PEM, EC
P-256), `ca.pem` its self-signed certificate (what the broker and the devices trust), `crl.pem` the
latest revocation list. The key is kept as carefully as the signing keys (docs/security.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud.exceptions import InsecureFileError, InvalidValueError, SigningError
from cloud.filemodes import check_private, directory_lock, private_dir, write_private
from wire.topics import DEVICE_ID_PATTERN, reserved_device_id

MAX_CSR_BYTES = 8 * 1024  # a P-256 CSR is ~500 B, an RSA-4096 one ~1.7 KB
MAX_CERTIFICATE_BYTES = 16 * 1024
DEVICE_DAYS = 365  # how long a device certificate is valid
CA_DAYS = 20 * 365
CRL_DAYS = 30  # a CRL is re-issued well before its next update: a broker refuses every client after it
CLOCK_SKEW = timedelta(minutes=5)  # a certificate is valid from a little before it was issued
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
FLEET_CA_NAME = "DiReDi fleet CA"
# Claim certificates (enrolment by claim) come from a CA of their own, which the broker never trusts:
# a claim can reach the enrolment route and nothing else.
CLAIM_CA_NAME = "DiReDi claim CA"
CLAIM_PREFIX = "claim-"
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate, as provisioning records and returns it."""

    pem: str
    serial: int
    not_after: datetime
    sha256: str  # of the DER certificate: what the registry and the audit log name it by


class FleetCA:
    """The CA in one directory; `open` creates it on first use."""

    def __init__(
        self, directory: Path, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
    ) -> None:
        self.directory = directory
        self._key = key
        self.certificate = certificate

    @classmethod
    def open(cls, directory: Path, *, name: str = FLEET_CA_NAME) -> FleetCA:
        """The CA in `directory`, made (key and self-signed certificate named `name`) if it holds none;
        SigningError if its files are unreadable or open to others."""
        private_dir(directory)
        with directory_lock(directory):  # several API workers may start on a fresh directory at once
            if not (directory / "ca.key").exists():
                _create(directory, name)
        try:
            check_private(directory, "the fleet CA's directory")
            check_private(directory / "ca.key", "the fleet CA's key")
        except InsecureFileError as exc:
            raise SigningError(str(exc)) from None
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except (OSError, ValueError, UnsupportedAlgorithm) as exc:
            raise SigningError(f"the fleet CA in {directory} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
            raise SigningError(f"the fleet CA in {directory}: ca.key is not the key of ca.pem")
        return cls(directory, key, certificate)

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def issue(
        self, csr_pem: str | bytes, device_id: str, *, days: int = DEVICE_DAYS, now: datetime | None = None
    ) -> IssuedCertificate:
        """Certify the key of `csr_pem` as device `device_id` (CN = the id, for TLS client authentication
        only). InvalidValueError says why a request is refused: not a CSR, a bad signature, a weak key,
        or a subject that names another device."""
        csr = check_signing_request(csr_pem, device_id)
        now = now or datetime.now(UTC)
        public_key = csr.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        der = certificate.public_bytes(serialization.Encoding.DER)
        return IssuedCertificate(
            pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
            serial=certificate.serial_number,
            not_after=certificate.not_valid_after_utc,
            sha256=hashlib.sha256(der).hexdigest(),
        )

    def issue_claim(self, batch: str, *, days: int = DEVICE_DAYS) -> tuple[bytes, IssuedCertificate]:
        """A claim credential for a batch of device images: a new key (PKCS#8 PEM) and its certificate,
        CN = `claim-<batch>`. The key is made here, not on a device: every image of the batch holds it."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"{CLAIM_PREFIX}{batch}"
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256())
        )
        issued = self.issue(request.public_bytes(serialization.Encoding.PEM), name, days=days)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return pem, issued

    def signed(self, certificate: x509.Certificate) -> bool:
        """Whether this CA issued `certificate` (its issuer and signature), current or not."""
        if certificate.issuer != self.certificate.subject:
            return False
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def write_crl(
        self, revoked: Iterable[tuple[int, datetime]], *, now: datetime | None = None, days: int = CRL_DAYS
    ) -> Path:
        """Issue the revocation list of these (serial, revoked at) and write it to `crl.pem` (atomically:
        a broker reloading it never reads half a file); return its path."""
        now = now or datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + timedelta(days=days))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        for serial, at in sorted(set(revoked)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
            )
        pem = builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        # A broker that reads a bad CRL may run on without revocation (mosquitto 2.0 does): what is
        # written is read back and checked first.
        self.check_crl(pem, now=now)
        path = self.directory / "crl.pem"
        tmp = path.with_name(".crl.pem.tmp")
        tmp.write_bytes(pem)
        tmp.replace(path)
        return path

    def check_crl(self, pem: bytes, *, now: datetime | None = None) -> datetime:
        """The next update of the CRL in `pem` if this CA signed it and it is current, else SigningError."""
        now = now or datetime.now(UTC)
        try:
            crl = x509.load_pem_x509_crl(pem)
        except ValueError as exc:
            raise SigningError(f"not a CRL: {exc}") from None
        if crl.issuer != self.certificate.subject or not crl.is_signature_valid(self._key.public_key()):
            raise SigningError("the CRL is not signed by the fleet CA")
        if crl.next_update_utc is None or crl.next_update_utc <= now:
            raise SigningError("the CRL's next update has passed: every device would be refused")
        return crl.next_update_utc


def load_certificate(pem: bytes) -> x509.Certificate:
    """The certificate in `pem`; InvalidValueError if it is not one."""
    if len(pem) > MAX_CERTIFICATE_BYTES:
        raise InvalidValueError("the certificate is too large")
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise InvalidValueError("not a PEM certificate") from None


def certificate_sha256(certificate: x509.Certificate) -> str:
    """The SHA-256 of the DER of `certificate`: what the registry names a device's certificate by."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(certificate: x509.Certificate) -> str | None:
    """The certificate's one subject CN, or None."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


def _create(directory: Path, common_name: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # The certificate first: a directory with a key always has its certificate.
    (directory / "ca.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    write_private(directory / "ca.key", pem)


def check_signing_request(csr_pem: str | bytes, device_id: str) -> x509.CertificateSigningRequest:
    """The request in `csr_pem` if the CA would certify it as `device_id`, else InvalidValueError."""
    csr = _parse_csr(csr_pem)
    _check_request(csr, device_id)
    return csr


def _parse_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise InvalidValueError(
            f"the certificate signing request is {len(data)} bytes; at most {MAX_CSR_BYTES}"
        )
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise InvalidValueError(
            "not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)"
        ) from None
    if not csr.is_signature_valid:
        raise InvalidValueError("the certificate signing request's signature does not verify")
    return csr


def _check_request(csr: x509.CertificateSigningRequest, device_id: str) -> None:
    if not re.fullmatch(DEVICE_ID_PATTERN, device_id) or reserved_device_id(device_id):
        raise InvalidValueError(f"{device_id!r} is not a device id")
    try:
        key = csr.public_key()
    except UnsupportedAlgorithm:
        raise InvalidValueError("the request's key is of a kind the CA does not certify") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise InvalidValueError(f"the request's key is on curve {key.curve.name}; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise InvalidValueError(
                f"the request's RSA key has {key.key_size} bits; at least {_MIN_RSA_BITS}"
            )
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidValueError(
            "the request's key is of a kind the CA does not certify (EC P-256, RSA, Ed25519)"
        )
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names and [n.value for n in names] != [device_id]:
        said = ", ".join(str(n.value) for n in names)
        raise InvalidValueError(f"the request names {said!r}, not device {device_id!r}")
