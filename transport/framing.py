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
from collections.abc import Callable
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


# Headers that carry a schema or a tensor manifest may be large (up to max_header_bytes); every other header is a
# handful of fields and is held to max_control_header_bytes, so a claimed length cannot reserve a megabyte each.
LARGE_HEADER_TYPES = frozenset({MsgType.JOIN, MsgType.UPDATE, MsgType.AGGREGATE})


@dataclass(frozen=True)
class FramePrefix:
    """The 16-byte prefix of a frame, checked before anything of the frame is buffered."""

    msg_type: MsgType
    header_len: int
    body_len: int


# Called with each frame's prefix once the generic checks pass; raises ProtocolError to refuse the frame before a
# byte of it is buffered (the connection uses it for stream-kind, grant and budget checks).
PrefixCheck = Callable[[FramePrefix], None]


class FrameDecoder:
    """Feed stream bytes in any chunking; get whole messages out.

    Every check the prefix allows (type, a body on a type that has none, the header and body limits, the caller's
    ``check_prefix``) runs before anything of the frame is buffered, and buffers grow only with bytes received: a
    prefix that claims a gigabyte costs the receiver nothing until the gigabyte arrives.
    """

    def __init__(self, limits: WireLimits = DEFAULT_LIMITS, check_prefix: PrefixCheck | None = None) -> None:
        self._limits = limits
        self._check_prefix = check_prefix
        self._buf = bytearray()
        self._pending: FramePrefix | None = None
        self._body: bytearray | None = None

    @property
    def idle(self) -> bool:
        """True when no partial frame is buffered (a stream may end here cleanly)."""
        return not self._buf and self._pending is None

    @property
    def buffered(self) -> int:
        """Bytes of the unfinished frame held now (prefix, header and body bytes received so far)."""
        return len(self._buf) + (len(self._body) if self._body is not None else 0)

    @property
    def pending(self) -> FramePrefix | None:
        """The prefix of the frame being received, once its 16 bytes are in."""
        return self._pending

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
                prefix = bytes(self._buf)
                self._buf.clear()  # a refused prefix leaves nothing held
                self._pending = self._parse_prefix(prefix)
            p = self._pending
            if len(self._buf) < p.header_len:
                need = p.header_len - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < p.header_len:
                    break
            if self._body is None:
                self._body = bytearray()  # grows with the bytes that arrive, never to the size the prefix claims
            need = p.body_len - len(self._body)
            take = view[:need]
            self._body += take
            view = view[len(take) :]
            if len(self._body) < p.body_len:
                break
            header = parse_header(p.msg_type, bytes(self._buf))
            out.append(Message(header=header, body=self._body))  # handed over, not copied (64 MiB = ~40 ms)
            self._buf.clear()
            self._pending = None
            self._body = None
        return out

    def _parse_prefix(self, prefix: bytes) -> FramePrefix:
        magic, version, msg_type, hlen, blen = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {magic!r}", code=ErrorCode.MALFORMED_FRAME)
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"unsupported protocol version {version}", code=ErrorCode.UNSUPPORTED_VERSION)
        if msg_type not in HEADER_TYPES:
            raise ProtocolError(f"unknown message type {msg_type}", code=ErrorCode.UNKNOWN_MESSAGE_TYPE)
        mtype = MsgType(msg_type)
        lim = self._limits
        max_header = lim.max_header_bytes if mtype in LARGE_HEADER_TYPES else lim.max_control_header_bytes
        if hlen == 0 or hlen > max_header:
            raise ProtocolError(
                f"{mtype.name} header length {hlen} out of bounds (1..{max_header})", code=ErrorCode.LIMIT_EXCEEDED
            )
        if blen and not HEADER_TYPES[mtype].has_body:
            raise ProtocolError(
                f"{mtype.name} carries no body (prefix claims {blen} bytes)", code=ErrorCode.MALFORMED_FRAME
            )
        if blen > lim.max_body_bytes:
            raise ProtocolError(
                f"body length {blen} exceeds the limit {lim.max_body_bytes}",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        p = FramePrefix(mtype, hlen, blen)
        if self._check_prefix is not None:
            self._check_prefix(p)
        return p
