"""Mutual TLS: verify and bind client certificates.

Neither QUIC backend verifies a client's chain, and both accept an empty Certificate message; each backend
makes its server request a certificate on every full handshake (:mod:`.backend_aioquic`, :mod:`.qh3_tls`).
Here:

* :class:`ClientCertVerifier` verifies the presented chain with ``cryptography`` (chain to our CA, validity
  period, key usage, client-auth EKU), refuses revoked serials, and derives the client id from the
  certificate (subject CN, which must agree with a ``fedquic://client/<id>`` URI SAN when one is present).

The server reads the identity once the handshake completes, before any fedquic message is handled, and
refuses a HELLO that claims another id. A full handshake always carries a certificate; a resumed one (a
session ticket, 0-RTT) carries none and takes the identity recorded with the ticket
(:mod:`fedquic.transport.tickets`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ..common.errors import ErrorCode, TransportError
from .backend import backend_for

URI_PREFIX = "fedquic://client/"


class CertificateError(TransportError):
    code = ErrorCode.CERTIFICATE


@dataclass(frozen=True)
class ClientIdentity:
    client_id: str
    serial: int
    fingerprint: str  # SHA-256 of the DER certificate, hex


def load_revoked(path: Path | None) -> frozenset[int]:
    """Serial numbers (hex, one per line, '#' comments) of revoked client certificates."""
    if path is None or not path.exists():
        return frozenset()
    serials = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            serials.add(int(line, 16))
    return frozenset(serials)


class ClientCertVerifier:
    """Verifies client certificates; the revocation list file is re-read whenever it changes."""

    def __init__(self, ca_file: Path, revoked_file: Path | None = None) -> None:
        try:
            self._roots = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
        except (OSError, ValueError) as exc:
            raise CertificateError(f"cannot load the client CA {ca_file}: {exc}") from exc
        self._store = Store(self._roots)
        self._revoked_file = revoked_file
        self._revoked_mtime: float | None = None
        self._revoked: frozenset[int] = frozenset()

    @property
    def revoked(self) -> frozenset[int]:
        path = self._revoked_file
        mtime = path.stat().st_mtime if path is not None and path.exists() else None
        if mtime != self._revoked_mtime:
            self._revoked, self._revoked_mtime = load_revoked(path), mtime
        return self._revoked

    def verify(
        self, leaf: x509.Certificate | None, chain: list[x509.Certificate], now: dt.datetime | None = None
    ) -> ClientIdentity:
        if leaf is None:
            raise CertificateError("the client presented no certificate (mutual TLS is required)")
        builder = PolicyBuilder().store(self._store)
        if now is not None:
            builder = builder.time(now)
        try:
            builder.build_client_verifier().verify(leaf, chain)
        except VerificationError as exc:
            raise CertificateError(f"client certificate refused: {exc}") from None
        if leaf.serial_number in self.revoked:
            raise CertificateError(f"client certificate {leaf.serial_number:x} is revoked")
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cns:
            raise CertificateError("client certificate has no subject common name")
        client_id = str(cns[0].value)
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URI_PREFIX)]
        except x509.ExtensionNotFound:
            uris = []
        if uris and f"{URI_PREFIX}{client_id}" not in uris:
            raise CertificateError(f"client certificate CN {client_id!r} disagrees with its SAN {uris}")
        return ClientIdentity(client_id, leaf.serial_number, leaf.fingerprint(hashes.SHA256()).hex())

    def verify_connection(self, quic: Any) -> ClientIdentity:
        """Verify what the client of a server-side ``QuicConnection`` (either backend) presented."""
        leaf, chain = backend_for(quic).peer_certificates(quic)
        return self.verify(leaf, chain)
