"""Frame encoding and an incremental, bounded frame decoder (pure: no I/O, no aioquic).

Frame layout (big-endian), see docs/protocol.md:

    offset  size  field
    0       2     magic b"FQ"
    2       1     protocol version
    3       1     message type (MsgType)
    4       4     header length H (JSON, UTF-8)
    8       8     body length B
    16      H     header
    16+H    B     body

A QUIC stream carries a sequence of frames; bulk transfers put one frame on a stream of their own.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from pydantic import ValidationError

from ..common.errors import ErrorCode, ProtocolError
from ..common.limits import DEFAULT_LIMITS, WireLimits
from ..common.messages import HEADER_TYPES, PROTOCOL_VERSION, SUPPORTED_VERSIONS, Header, Message, MsgType

MAGIC = b"FQ"
PREFIX = struct.Struct(">2sBBIQ")
PREFIX_SIZE = PREFIX.size  # 16


def encode_frame(header: Header, body: bytes = b"", version: int = PROTOCOL_VERSION) -> bytes:
    return encode_frame_head(header, len(body), version) + body


def encode_frame_head(header: Header, body_len: int, version: int = PROTOCOL_VERSION) -> bytes:
    """Prefix and header of a frame whose body (``body_len`` bytes) is written separately."""
    hjson = header_bytes(header)
    return PREFIX.pack(MAGIC, version, int(header.msg_type), len(hjson), body_len) + hjson


def frame_size(header: Header, body_len: int) -> int:
    return PREFIX_SIZE + len(header_bytes(header)) + body_len


def header_bytes(header: Header) -> bytes:
    """The JSON header. Fields that are None are left out (a reader fills in None): a tensor manifest
    would otherwise spend ~90 bytes per tensor on nulls."""
    return header.model_dump_json(exclude_none=True).encode()


def parse_header(msg_type: int, raw: bytes) -> Header:
    try:
        mtype = MsgType(msg_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {msg_type}", code=ErrorCode.UNKNOWN_MESSAGE_TYPE) from None
    cls = HEADER_TYPES[mtype]
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{mtype.name} header is not JSON: {exc}", code=ErrorCode.BAD_HEADER) from None
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(
            f"{mtype.name} header invalid at {loc!r}: {first.get('msg')}", code=ErrorCode.BAD_HEADER
        ) from None


@dataclass
class _Pending:
    msg_type: int
    header_len: int
    body_len: int


class FrameDecoder:
    """Feed stream bytes in any chunking; get whole messages out. Limits apply before allocation."""

    def __init__(self, limits: WireLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._pending: _Pending | None = None
        self._body: bytearray | None = None
        self._body_filled = 0

    @property
    def idle(self) -> bool:
        """True when no partial frame is buffered (a stream may end here cleanly)."""
        return not self._buf and self._pending is None

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._body_filled

    def feed(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        view = memoryview(data)
        while view:
            if self._pending is None:
                need = PREFIX_SIZE - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < PREFIX_SIZE:
                    break
                self._pending = self._parse_prefix(bytes(self._buf))
                self._buf.clear()
            p = self._pending
            if len(self._buf) < p.header_len:
                need = p.header_len - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < p.header_len:
                    break
            if self._body is None:
                self._body = bytearray(p.body_len)  # bounded by the limit checked in _parse_prefix
                self._body_filled = 0
            need = p.body_len - self._body_filled
            take = view[:need]
            self._body[self._body_filled : self._body_filled + len(take)] = take
            self._body_filled += len(take)
            view = view[len(take) :]
            if self._body_filled < p.body_len:
                break
            header = parse_header(p.msg_type, bytes(self._buf))
            if bool(p.body_len) and not header.has_body:
                raise ProtocolError(f"{header.msg_type.name} carries no body", code=ErrorCode.MALFORMED_FRAME)
            out.append(Message(header=header, body=self._body))  # handed over, not copied (64 MiB = ~40 ms)
            self._buf.clear()
            self._pending = None
            self._body = None
            self._body_filled = 0
        return out

    def _parse_prefix(self, prefix: bytes) -> _Pending:
        magic, version, msg_type, hlen, blen = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {magic!r}", code=ErrorCode.MALFORMED_FRAME)
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"unsupported protocol version {version}", code=ErrorCode.UNSUPPORTED_VERSION)
        if msg_type not in HEADER_TYPES:
            raise ProtocolError(f"unknown message type {msg_type}", code=ErrorCode.UNKNOWN_MESSAGE_TYPE)
        if hlen == 0 or hlen > self._limits.max_header_bytes:
            raise ProtocolError(f"header length {hlen} out of bounds", code=ErrorCode.LIMIT_EXCEEDED)
        if blen > self._limits.max_body_bytes:
            raise ProtocolError(
                f"body length {blen} exceeds the limit {self._limits.max_body_bytes}",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        return _Pending(msg_type, hlen, blen)
