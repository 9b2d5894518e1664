"""One error hierarchy for fedquic. Library errors are mapped to these at package boundaries.

Every error carries a numbered :class:`ErrorCode` so it can cross the wire in an ERROR message
(see ``docs/protocol.md``). ``Local*`` errors mean we misused something; ``Remote*``/``Protocol``
errors mean the peer sent something we refuse (the split h11 makes between its two protocol errors).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Numbered error codes, stable on the wire."""

    INTERNAL = 1
    MALFORMED_FRAME = 2
    UNSUPPORTED_VERSION = 3
    UNKNOWN_MESSAGE_TYPE = 4
    LIMIT_EXCEEDED = 5
    BAD_HEADER = 6
    BAD_TENSOR = 7
    NON_FINITE = 8
    SCHEMA_MISMATCH = 9
    UNEXPECTED_MESSAGE = 10
    ROUND_NOT_OPEN = 11
    CONFLICTING_UPDATE = 12
    IDENTITY_MISMATCH = 13
    # 14 was JOB_FULL, never sent (a job has no client cap): reserved, never reused.
    TIMEOUT = 15
    SHUTTING_DOWN = 16
    DECOMPRESSION = 17
    CERTIFICATE = 18
    # The round closed before the update came; the client keeps the change for its next update.
    LATE_UPDATE = 19
    # The job is over: the server closes its connections with this code when it ends (a BYE may have been lost).
    JOB_ENDED = 20
    # HELLO's `encodings` lacks one the job sends (its downlink encoding, or fp32 for dense resets).
    UNSUPPORTED_ENCODING = 21


class FedQuicError(Exception):
    """Base of every error fedquic raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code.name}] {super().__str__()}"


class ConfigError(FedQuicError):
    """Invalid configuration or command-line input."""


class ProtocolError(FedQuicError):
    """The peer sent bytes or a message we refuse (malformed, out of bounds, out of order)."""

    code = ErrorCode.MALFORMED_FRAME


class CodecError(ProtocolError):
    """A tensor payload could not be encoded or decoded safely."""

    code = ErrorCode.BAD_TENSOR


class SchemaMismatchError(ProtocolError):
    """A peer's adapter schema or base-model fingerprint differs from the job's."""

    code = ErrorCode.SCHEMA_MISMATCH


class RemoteError(FedQuicError):
    """The peer reported an error to us in an ERROR message."""


class TransportError(FedQuicError):
    """The connection failed: handshake, certificate, timeout, or closed by the peer."""


class JobError(FedQuicError):
    """The federated job cannot continue (e.g. too few clients before the deadline)."""
