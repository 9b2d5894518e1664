"""Which failures end the client and which are worth another connection attempt."""

from __future__ import annotations

from ..common.errors import ErrorCode, RemoteError, TransportError
from ..common.messages import Error

# Refusals that a new attempt cannot change.
FINAL_CODES = frozenset(
    {
        ErrorCode.CERTIFICATE,
        ErrorCode.IDENTITY_MISMATCH,
        ErrorCode.SCHEMA_MISMATCH,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNSUPPORTED_ENCODING,
    }
)
# ERROR messages that mean "the server is going away or too slow", worth a reconnect.
_RETRYABLE_REMOTE = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.TIMEOUT})
# An UPDATE refused with one of these came after its round closed: keep the change for the next round.
LATE_CODES = frozenset({ErrorCode.LATE_UPDATE, ErrorCode.ROUND_NOT_OPEN})


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed connection is worth another attempt."""
    if isinstance(exc, TransportError):
        return exc.code not in FINAL_CODES
    if isinstance(exc, RemoteError):
        return exc.code in _RETRYABLE_REMOTE
    return False


def remote_error(h: Error) -> RemoteError:
    code = ErrorCode(h.code) if h.code in ErrorCode._value2member_map_ else None
    return RemoteError(f"server refused: {h.message}", code=code)


__all__ = ["FINAL_CODES", "LATE_CODES", "is_retryable", "remote_error"]
