import contextlib
import struct

import pytest
from fedquic.common.codec import Manifest
from fedquic.common.errors import ErrorCode, ProtocolError
from fedquic.common.limits import WireLimits
from fedquic.common.messages import Aggregate, Heartbeat, Hello, MsgType
from fedquic.transport.framing import PREFIX, FrameDecoder, encode_frame
from hypothesis import given, settings
from hypothesis import strategies as st

HELLO = Hello(versions=(1,), client_id="c-1", base_fingerprint="ab12", num_samples=5)


def test_frames_decode_in_any_chunking() -> None:
    body = bytes(range(256)) * 10
    agg = Aggregate(round=2, contributors=1, manifest=Manifest(tensors=(), raw_size=len(body)))
    data = encode_frame(HELLO) + encode_frame(agg, body) + encode_frame(Heartbeat(seq=9))
    for chunk in (1, 7, 16, 1000, len(data)):
        dec = FrameDecoder()
        msgs = []
        for i in range(0, len(data), chunk):
            msgs += dec.feed(data[i : i + chunk])
        assert [m.type for m in msgs] == [MsgType.HELLO, MsgType.AGGREGATE, MsgType.HEARTBEAT]
        assert msgs[0].header == HELLO and msgs[1].body == body and dec.idle


def prefix(magic: bytes = b"FQ", version: int = 1, mtype: int = 9, hlen: int = 10, blen: int = 0) -> bytes:
    return PREFIX.pack(magic, version, mtype, hlen, blen)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (prefix(magic=b"XX"), ErrorCode.MALFORMED_FRAME),
        (prefix(version=9), ErrorCode.UNSUPPORTED_VERSION),
        (prefix(mtype=200), ErrorCode.UNKNOWN_MESSAGE_TYPE),
        (prefix(hlen=0), ErrorCode.LIMIT_EXCEEDED),
        (prefix(hlen=0xFFFFFFFF), ErrorCode.LIMIT_EXCEEDED),
        (prefix(mtype=5, blen=0xFFFFFFFFFFFFFFFF), ErrorCode.LIMIT_EXCEEDED),  # UPDATE over the body limit
        (prefix(blen=0xFFFFFFFFFFFFFFFF), ErrorCode.MALFORMED_FRAME),  # a HEARTBEAT claiming a body at all
        (prefix(hlen=(1 << 16) + 1), ErrorCode.LIMIT_EXCEEDED),  # a control header over its own, smaller limit
        (prefix(hlen=4) + b"{{{{", ErrorCode.BAD_HEADER),
        (prefix(hlen=2) + b"{}", ErrorCode.BAD_HEADER),  # Heartbeat without its seq
        (
            prefix(hlen=13, blen=1) + b'{"seq": 1}   ' + b"x",
            ErrorCode.MALFORMED_FRAME,
        ),  # body on a control msg
    ],
)
def test_malformed_frames_raise_our_protocol_error(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as ei:
        FrameDecoder(WireLimits(max_body_bytes=1 << 20)).feed(data)
    assert ei.value.code is code


def test_unknown_header_fields_are_refused() -> None:
    h = b'{"seq": 1, "evil": true}'
    with pytest.raises(ProtocolError) as ei:
        FrameDecoder().feed(prefix(hlen=len(h)) + h)
    assert ei.value.code is ErrorCode.BAD_HEADER


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_random_bytes_give_messages_or_our_error(data: bytes) -> None:
    dec = FrameDecoder(WireLimits(max_body_bytes=1 << 16, max_header_bytes=1 << 12))
    with contextlib.suppress(ProtocolError):
        dec.feed(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=3))
def test_mutated_valid_frames_give_messages_or_our_error(noise: bytes, where: int) -> None:
    frame = bytearray(encode_frame(HELLO))
    pos = [4, 8, 16, len(frame) - 5][where]
    frame[pos : pos + len(noise)] = noise
    with contextlib.suppress(ProtocolError):
        FrameDecoder(WireLimits(max_body_bytes=1 << 16)).feed(bytes(frame))


def test_prefix_is_sixteen_bytes_big_endian() -> None:
    f = encode_frame(Heartbeat(seq=1))
    magic, ver, mtype, hlen, blen = struct.unpack(">2sBBIQ", f[:16])
    assert (magic, ver, mtype, blen) == (b"FQ", 1, MsgType.HEARTBEAT, 0) and hlen == len(f) - 16
