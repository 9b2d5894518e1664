"""Mutual TLS for qh3 2.1: a TLS server that requests, reads and checks client certificates.

qh3's TLS 1.3 server has no client authentication: it never sends a CertificateRequest, has no state for the
client's Certificate and CertificateVerify, and right after its own flight it anticipates the client's Finished
and issues a session ticket, both from a transcript that would lack the client's certificate. Tied to the pinned
``qh3==2.1.*``, this module adds what RFC 8446 (4.3.2, 4.4.2-4.4.4) asks of a server that authenticates clients:

* on a full handshake (never a PSK one: 4.3.2 forbids it), a CertificateRequest right before the server's
  Certificate, offering the signature algorithms the context supports;
* the client's Certificate (possibly empty: the application then refuses the connection, as with aioquic),
  its CertificateVerify, checked against the certificate's public key over the transcript, and its Finished,
  checked against the transcript that includes both;
* the session ticket after the client's Finished, so that its resumption secret covers the whole handshake
  (which the client derives it from) and the ticket's handler sees the verified certificate.

A server-side :class:`qh3.tls.Context` gets this behaviour by taking :class:`ClientAuthContext` as its class
(:func:`request_client_certificate`); nothing else in the process changes. The chain itself (CA, validity, EKU,
revocation) is checked by :class:`fedquic.transport.mtls.ClientCertVerifier` once the handshake completes.
"""

from __future__ import annotations

import contextvars
import hmac
import os
import struct
from enum import IntEnum
from typing import Any

from qh3 import tls as _tls

# A client certificate chain larger than this is refused before it is buffered (ours are ~1 kB; a chain of a
# few intermediates stays far below it).
MAX_CLIENT_AUTH_MESSAGE = 64 << 10

# The context whose ServerHello flight is being written: push_certificate adds the CertificateRequest for it.
_REQUESTING: contextvars.ContextVar[ClientAuthContext | None] = contextvars.ContextVar("_REQUESTING", default=None)
_push_certificate = _tls.push_certificate


class _Stage(IntEnum):
    CERTIFICATE = 1
    CERTIFICATE_VERIFY = 2
    FINISHED = 3


def _push_certificate_request(buf: Any, signature_algorithms: list[int]) -> None:
    """CertificateRequest (RFC 8446 4.3.2): an empty context and the signature_algorithms extension."""
    buf.push_uint8(_tls.HandshakeType.CERTIFICATE_REQUEST)
    with _tls.push_block(buf, 3):
        _tls.push_opaque(buf, 1, b"")
        with _tls.push_block(buf, 2), _tls.push_extension(buf, _tls.ExtensionType.SIGNATURE_ALGORITHMS):
            _tls.push_list(buf, 2, buf.push_uint16, signature_algorithms)


def _push_certificate_and_request(buf: Any, certificate: Any) -> None:
    """qh3's push_certificate; for a context that authenticates clients, its CertificateRequest first.

    Both messages are written inside the same ``push_message`` block of qh3's ServerHello flight, so both enter
    the transcript, in the order RFC 8446 4.4.1 gives (EncryptedExtensions, CertificateRequest, Certificate).
    """
    ctx = _REQUESTING.get()
    if ctx is not None:
        ctx._begin_client_auth()
        _push_certificate_request(buf, list(ctx._signature_algorithms))
    _push_certificate(buf, certificate)


_tls.push_certificate = _push_certificate_and_request


class ClientAuthContext(_tls.Context):
    """A server-side qh3 TLS context that authenticates the client; see the module docstring.

    Never constructed: :func:`request_client_certificate` gives an existing context this class.
    """

    _fq_stage: _Stage | None
    _fq_pending: bytes
    _fq_ticket_cb: Any
    _fq_alps: bool

    def _fq_init(self) -> None:
        self._fq_stage = None
        self._fq_pending = b""
        self._fq_ticket_cb = None
        self._fq_alps = False

    def _begin_client_auth(self) -> None:
        """Called while qh3 writes the server's flight of a full handshake, before its Certificate."""
        if self._alps_negotiated:
            raise _tls.AlertHandshakeFailure("ALPS with client authentication is not supported")
        self._fq_stage = _Stage.CERTIFICATE
        # qh3 skips its anticipation of the client's Finished when ALPS is negotiated (the transcript is not known
        # yet); with a client certificate to come it is not known either. Restored once the flight is written.
        self._fq_alps, self._alps_negotiated = self._alps_negotiated, True
        # Its ticket would carry a resumption secret from a transcript without the client's messages.
        self._fq_ticket_cb, self.new_session_ticket_cb = self.new_session_ticket_cb, None

    def _server_handle_hello(self, input_buf: Any, initial_buf: Any, handshake_buf: Any, onertt_buf: Any) -> None:
        token = _REQUESTING.set(self)
        try:
            super()._server_handle_hello(input_buf, initial_buf, handshake_buf, onertt_buf)
        finally:
            _REQUESTING.reset(token)
            if self._fq_stage is not None:
                self._alps_negotiated = self._fq_alps
                self.new_session_ticket_cb = self._fq_ticket_cb

    def handle_message(self, input_data: bytes, output_buf: dict[Any, Any], epoch: int = -1) -> None:
        if self._fq_stage is None:
            super().handle_message(input_data, output_buf, epoch)
            return
        self._fq_pending += input_data
        while self._fq_stage is not None and len(self._fq_pending) >= 4:
            length = 4 + int.from_bytes(self._fq_pending[1:4], byteorder="big")
            if length > MAX_CLIENT_AUTH_MESSAGE:
                raise _tls.AlertBadCertificate(f"a {length}-byte handshake message from the client is too large")
            if len(self._fq_pending) < length:
                break
            message, self._fq_pending = self._fq_pending[:length], self._fq_pending[length:]
            if epoch >= 0 and epoch != _tls.Epoch.HANDSHAKE:  # RFC 9001 4.1.3
                raise _tls.AlertUnexpectedMessage
            try:
                self._fq_handle(message, output_buf)
            except _tls.BufferReadError as exc:
                raise _tls.AlertDecodeError(f"malformed client handshake message: {exc}") from None
        if self._fq_stage is None and self._fq_pending:  # bytes after Finished: qh3 refuses them
            rest, self._fq_pending = self._fq_pending, b""
            super().handle_message(rest, output_buf, epoch)

    def _fq_handle(self, message: bytes, output_buf: dict[Any, Any]) -> None:
        buf = _tls.Buffer(data=message)
        kind = message[0]
        if self._fq_stage is _Stage.CERTIFICATE:
            if kind != _tls.HandshakeType.CERTIFICATE:
                raise _tls.AlertUnexpectedMessage("the client's Certificate was expected")
            certificate = _tls.pull_certificate(buf)
            self._fq_at_end(buf)
            if certificate.request_context != b"":
                raise _tls.AlertIllegalParameter("non-empty certificate_request_context")
            self.key_schedule.update_hash(message)
            if certificate.certificates:
                try:
                    self._peer_certificate = _tls.X509Certificate(certificate.certificates[0][0])
                    self._peer_certificate_chain = [_tls.X509Certificate(c[0]) for c in certificate.certificates[1:]]
                except Exception as exc:  # qh3's parser raises its own errors for a malformed DER
                    raise _tls.AlertBadCertificate(f"unreadable client certificate: {exc}") from None
                self._fq_stage = _Stage.CERTIFICATE_VERIFY
            else:  # no certificate: the handshake may finish; the application refuses the connection
                self._fq_stage = _Stage.FINISHED
        elif self._fq_stage is _Stage.CERTIFICATE_VERIFY:
            if kind != _tls.HandshakeType.CERTIFICATE_VERIFY:
                raise _tls.AlertUnexpectedMessage("the client's CertificateVerify was expected")
            verify = _tls.pull_certificate_verify(buf)
            self._fq_at_end(buf)
            if verify.algorithm not in self._signature_algorithms:
                raise _tls.AlertIllegalParameter("CertificateVerify uses a signature algorithm we did not offer")
            try:
                _tls.verify_with_public_key(
                    self._peer_certificate.public_key(),
                    verify.algorithm,
                    self.key_schedule.certificate_verify_data(b"TLS 1.3, client CertificateVerify"),
                    verify.signature,
                )
            except _tls.SignatureError as exc:
                raise _tls.AlertDecryptError(str(exc)) from None
            self.key_schedule.update_hash(message)
            self._fq_stage = _Stage.FINISHED
        else:
            if kind != _tls.HandshakeType.FINISHED:
                raise _tls.AlertUnexpectedMessage("the client's Finished was expected")
            finished = _tls.pull_finished(buf)
            self._fq_at_end(buf)
            expected = self.key_schedule.finished_verify_data(self._dec_key)
            if not hmac.compare_digest(finished.verify_data, expected):
                raise _tls.AlertDecryptError("the client's Finished does not match the transcript")
            self.key_schedule.update_hash(message)
            # as qh3's _server_handle_finished: commit the client's application traffic key
            self._dec_key = self._next_dec_key
            self._next_dec_key = None
            self.update_traffic_key_cb(
                _tls.Direction.DECRYPT, _tls.Epoch.ONE_RTT, self.key_schedule.cipher_suite, self._dec_key
            )
            self._set_state(_tls.State.SERVER_POST_HANDSHAKE)
            self._fq_stage = None
            self._fq_issue_ticket(output_buf[_tls.Epoch.ONE_RTT])

    @staticmethod
    def _fq_at_end(buf: Any) -> None:
        if not buf.eof():
            raise _tls.AlertDecodeError("extra bytes at the end of a handshake message")

    def _fq_issue_ticket(self, onertt_buf: Any) -> None:
        """The session ticket qh3 would have issued with its flight, now that the transcript is complete."""
        callback = self._fq_ticket_cb
        if callback is None or not self._psk_key_exchange_modes:
            return
        self._new_session_ticket = _tls.NewSessionTicket(
            ticket_lifetime=86400,
            ticket_age_add=struct.unpack("I", os.urandom(4))[0],
            ticket_nonce=b"",
            ticket=os.urandom(64),
            max_early_data_size=self._max_early_data,
        )
        _tls.push_new_session_ticket(onertt_buf, self._new_session_ticket)
        callback(self._build_session_ticket(self._new_session_ticket, self.handshake_extensions))


def request_client_certificate(quic: Any) -> None:
    """Make a server-side qh3 ``QuicConnection`` authenticate its client on every full handshake."""
    original = quic._create_tls

    def create_tls(remote_source_cid: bytes | None) -> Any:
        bridge = original(remote_source_cid)
        context = bridge.tls
        context.__class__ = ClientAuthContext
        context._fq_init()
        return bridge

    quic._create_tls = create_tls


def peer_certificates_der(quic: Any) -> tuple[bytes | None, list[bytes]]:
    """The client's certificate and the rest of its chain (DER), as received; (None, []) when it sent none."""
    context = quic.tls
    leaf = getattr(context, "_peer_certificate", None)
    if leaf is None:
        return None, []
    return leaf.public_bytes(), [c.public_bytes() for c in getattr(context, "_peer_certificate_chain", [])]
