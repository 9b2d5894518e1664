"""Development PKI made in code: a CA, a server certificate, and client certificates.

For real deployments use certificates from your own CA (see certs/README.md). Private keys are
written with mode 0600 and never belong in git.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class DevPki:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def client_cert(self, client_id: str) -> Path:
        return self.root / "clients" / f"{client_id}.pem"

    def client_key(self, client_id: str) -> Path:
        return self.root / "clients" / f"{client_id}.key"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load(pki: DevPki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only for leaves (ECDHE does the key exchange); certificate and CRL signing for the CA."""
    return x509.KeyUsage(
        digital_signature=True,
        key_encipherment=False,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    subject_cn: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
    hosts: tuple[str, ...] = (),
    days: int = 365,
    start: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = start or dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Key identifiers: RFC 5280 profile checks (cryptography's verifier) require them.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    if not server:
        names.append(x509.UniformResourceIdentifier(f"fedquic://client/{subject_cn}"))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def init_dev_pki(
    root: Path, *, server_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"), overwrite: bool = False
) -> DevPki:
    """Create a CA and a server certificate under ``root`` (kept if present unless ``overwrite``)."""
    pki = DevPki(Path(root))
    if pki.ca_cert.exists() and pki.server_cert.exists() and not overwrite:
        return pki
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedquic dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(pki.ca_key, ca_key)
    _write_cert(pki.ca_cert, ca_cert)
    cert, key = _leaf("fedquic-server", ca_cert, ca_key, server=True, hosts=server_hosts)
    _write_key(pki.server_key, key)
    _write_cert(pki.server_cert, cert)
    return pki


def issue_client_cert(
    pki: DevPki, client_id: str, *, days: int = 365, start: dt.datetime | None = None
) -> tuple[Path, Path]:
    """Issue a client certificate whose subject CN (and a fedquic://client/ID URI SAN) is the client id."""
    ca_cert, ca_key = _load(pki)
    cert, key = _leaf(client_id, ca_cert, ca_key, server=False, days=days, start=start)
    _write_key(pki.client_key(client_id), key)
    _write_cert(pki.client_cert(client_id), cert)
    return pki.client_cert(client_id), pki.client_key(client_id)


@dataclass(frozen=True)
class IssuedCert:
    client_id: str
    serial: int
    not_after: dt.datetime
    revoked: bool


def revoked_file(pki: DevPki) -> Path:
    return pki.root / "revoked.txt"


def list_client_certs(pki: DevPki) -> list[IssuedCert]:
    from .mtls import load_revoked

    revoked = load_revoked(revoked_file(pki))
    out = []
    for pem in sorted((pki.root / "clients").glob("*.pem")):
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        out.append(IssuedCert(pem.stem, cert.serial_number, cert.not_valid_after_utc, cert.serial_number in revoked))
    return out


def revoke_client_cert(pki: DevPki, client_id: str) -> int:
    """Add the client's certificate serial to the revocation list (re-read by a running server)."""
    pem = pki.client_cert(client_id)
    if not pem.exists():
        raise FileNotFoundError(f"no certificate for client {client_id!r} in {pki.root / 'clients'}")
    serial = x509.load_pem_x509_certificate(pem.read_bytes()).serial_number
    with revoked_file(pki).open("a") as f:
        f.write(f"{serial:x}  # {client_id} revoked {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}\n")
    return serial
