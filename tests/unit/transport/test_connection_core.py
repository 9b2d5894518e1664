"""The sans-I/O core driven by hand-made QUIC events and a fake clock: no sockets, no event loop. Every test runs
once per QUIC backend (the core tells the events of each apart)."""

from __future__ import annotations

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived, StreamReset
from fedquic.common.codec import Manifest
from fedquic.common.errors import ErrorCode
from fedquic.common.limits import WireLimits
from fedquic.common.messages import Aggregate, Heartbeat, MsgType, Update
from fedquic.transport.backend import get_backend
from fedquic.transport.budget import BufferBudget
from fedquic.transport.connection import (
    BulkPermit,
    FedQuicConnection,
    MessageReceived,
    PeerClosed,
    ProtocolViolation,
    StreamAborted,
)
from fedquic.transport.framing import encode_frame

CONTROL = 0  # first client-initiated bidirectional stream
QUIC_NAMES = ("QuicConfiguration", "QuicConnection", "StreamDataReceived", "StreamReset", "ConnectionTerminated")


@pytest.fixture(autouse=True)
def _backend_classes(quic_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's QUIC names are the backend's under test (the factories below look them up when called)."""
    backend = get_backend(quic_backend)
    for name in QUIC_NAMES:
        monkeypatch.setitem(globals(), name, getattr(backend, name))


def uni(i: int) -> int:
    return 4 * i + 2  # client-initiated unidirectional stream ids: 2, 6, 10, ...


@pytest.fixture(scope="module")
def server_core(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A factory of server-side cores over a real (never handshaken) QuicConnection."""
    from fedquic.transport.pki import init_dev_pki

    pki = init_dev_pki(tmp_path_factory.mktemp("core-pki"))

    def make(
        established: bool = True, permit: bool = True, budget: object = None, **limits: object
    ) -> FedQuicConnection:
        cfg = QuicConfiguration(is_client=False)
        cfg.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        quic = QuicConnection(configuration=cfg, original_destination_connection_id=bytes(8))
        core = FedQuicConnection(quic, limits=WireLimits(**limits), budget=budget)  # type: ignore[arg-type]
        core.established = established  # as after HandshakeCompleted (before it, data is 0-RTT)
        if permit:  # as after JOIN and an UPLOAD_GRANT: UPDATE streams of any size and number
            core.permit(MsgType.UPDATE, BulkPermit(max_body=1 << 30))
        return core

    return make


def bulk_frame(n: int) -> bytes:
    return encode_frame(Update(**UPDATE_FIELDS, manifest=Manifest(tensors=(), raw_size=n)), bytes(n))


UPDATE_FIELDS = {"round": 1, "client_id": "c", "num_samples": 1, "base_hash": "ab"}


def test_messages_come_out_whole_whatever_the_chunking(server_core) -> None:  # type: ignore[no-untyped-def]
    core = server_core()
    frame = bulk_frame(5000)
    events = []
    for i in range(0, len(frame), 1000):
        events += core.handle_event(StreamDataReceived(frame[i : i + 1000], i + 1000 >= len(frame), uni(0)), 1.0)
    events += core.handle_event(StreamDataReceived(encode_frame(Heartbeat(seq=3)), False, CONTROL), 2.0)
    kinds = [(type(e).__name__, e.message.type, e.on_control) for e in events if isinstance(e, MessageReceived)]
    assert kinds == [("MessageReceived", MsgType.UPDATE, False), ("MessageReceived", MsgType.HEARTBEAT, True)]
    assert core.control_stream_id == CONTROL and core.buffered_bytes() == 0


def test_too_many_open_bulk_streams_is_a_violation(server_core) -> None:  # type: ignore[no-untyped-def]
    core = server_core(max_open_streams=2)
    half = bulk_frame(100)[:50]
    assert core.handle_event(StreamDataReceived(half, False, uni(0)), 0.0) == []
    assert core.handle_event(StreamDataReceived(half, False, uni(1)), 0.0) == []
    [ev] = core.handle_event(StreamDataReceived(half, False, uni(2)), 0.0)
    assert isinstance(ev, ProtocolViolation) and ev.error.code is ErrorCode.LIMIT_EXCEEDED
    assert core.handle_event(StreamDataReceived(half, False, uni(3)), 0.0) == []  # nothing more after a violation


def test_buffered_bytes_are_bounded_per_connection(server_core) -> None:  # type: ignore[no-untyped-def]
    core = server_core(max_buffered_bytes=1 << 16)
    # a claim over the bound is refused at its prefix, before anything is buffered
    [ev] = core.handle_event(StreamDataReceived(bulk_frame(1 << 17)[:32], False, uni(0)), 0.0)
    assert isinstance(ev, ProtocolViolation) and ev.error.code is ErrorCode.LIMIT_EXCEEDED
    # claims under it that together pass it: refused when the bytes held would
    core = server_core(max_buffered_bytes=1 << 16)
    frame = bulk_frame(40_000)
    assert core.handle_event(StreamDataReceived(frame[:30_000], False, uni(0)), 0.0) == []
    assert core.buffered_bytes() == 30_000 - 16  # what is held: header and body bytes (the prefix is parsed)
    [ev] = core.handle_event(StreamDataReceived(frame[:36_000], False, uni(1)), 0.0)
    assert isinstance(ev, ProtocolViolation) and ev.error.code is ErrorCode.LIMIT_EXCEEDED


@pytest.mark.reliability
def test_a_claimed_body_costs_nothing_until_its_bytes_arrive(server_core) -> None:  # type: ignore[no-untyped-def]
    """17 bytes claiming a gigabyte used to allocate (and zero) the gigabyte at once."""
    core = server_core()
    claim = bytearray(encode_frame(Update(**UPDATE_FIELDS, manifest=Manifest(tensors=(), raw_size=1 << 29)), b""))
    claim[8:16] = (1 << 29).to_bytes(8, "big")  # the prefix now claims a 512 MiB body
    assert core.handle_event(StreamDataReceived(bytes(claim) + b"x", False, uni(0)), 0.0) == []
    assert core.buffered_bytes() == len(claim) - 16 + 1  # the header and one body byte, not 512 MiB


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("stream", "frame", "why"),
    [
        (uni(0), encode_frame(Heartbeat(seq=1)), "a control message on a bulk stream"),
        (CONTROL, bulk_frame(10), "a bulk message on the control stream"),
        (uni(0), bulk_frame(10), "an UPDATE with no grant"),
        (
            uni(0),
            encode_frame(Aggregate(round=1, contributors=0, manifest=Manifest(tensors=(), raw_size=4)), bytes(4)),
            "an AGGREGATE sent to a server",
        ),
    ],
)
def test_streams_the_server_did_not_allow_are_refused_at_their_first_bytes(
    server_core, stream: int, frame: bytes, why: str
) -> None:  # type: ignore[no-untyped-def]
    core = server_core(permit=False)
    [ev] = core.handle_event(StreamDataReceived(frame[:16], False, stream), 0.0)
    assert isinstance(ev, ProtocolViolation), why
    assert ev.error.code is ErrorCode.UNEXPECTED_MESSAGE
    assert core.buffered_bytes() == 0


def test_a_grant_lets_one_update_of_its_size_through(server_core) -> None:  # type: ignore[no-untyped-def]
    budget = BufferBudget(limit=1 << 20)
    core = server_core(permit=False, budget=budget)
    assert budget.try_reserve(100)
    core.permit(MsgType.UPDATE, BulkPermit(max_body=100, count=1, reserved=True))
    [msg] = core.handle_event(StreamDataReceived(bulk_frame(100), True, uni(0)), 0.0)
    assert isinstance(msg, MessageReceived)
    assert budget.used == 0  # the reservation went back when the frame completed
    [ev] = core.handle_event(StreamDataReceived(bulk_frame(100)[:16], False, uni(1)), 0.0)  # the grant is spent
    assert isinstance(ev, ProtocolViolation)
    # larger than granted: refused at the prefix
    core = server_core(permit=False, budget=budget)
    core.permit(MsgType.UPDATE, BulkPermit(max_body=99, count=1))
    [ev] = core.handle_event(StreamDataReceived(bulk_frame(100)[:16], False, uni(0)), 0.0)
    assert isinstance(ev, ProtocolViolation) and ev.error.code is ErrorCode.LIMIT_EXCEEDED


@pytest.mark.reliability
def test_the_server_wide_budget_refuses_unreserved_streams_and_a_close_frees_everything(server_core) -> None:  # type: ignore[no-untyped-def]
    budget = BufferBudget(limit=1 << 16)
    a, b = server_core(budget=budget), server_core(budget=budget)
    assert a.handle_event(StreamDataReceived(bulk_frame(50_000)[:40_000], False, uni(0)), 0.0) == []
    assert budget.held == 40_000 - 16
    [ev] = b.handle_event(StreamDataReceived(bulk_frame(50_000)[:100], False, uni(0)), 0.0)  # 40k + 50k > 64k
    assert isinstance(ev, ProtocolViolation) and ev.error.code is ErrorCode.LIMIT_EXCEEDED
    assert budget.try_reserve(10_000)
    a.permit(MsgType.UPDATE, BulkPermit(max_body=10_000, count=1, reserved=True))
    a.close()  # the connection went: its bytes and its unused reservation are back
    assert budget.used == 0 and a.buffered_bytes() == 0


def test_a_control_frame_must_make_progress(server_core) -> None:  # type: ignore[no-untyped-def]
    core = server_core(control_frame_timeout_s=30.0)
    hb = encode_frame(Heartbeat(seq=1))
    for i in range(5):  # one byte every 10 s
        core.handle_event(StreamDataReceived(hb[i : i + 1], False, CONTROL), now=10.0 * i)
    [ev] = core.expire(now=41.0)
    assert isinstance(ev, ProtocolViolation) and ev.error.code is ErrorCode.TIMEOUT
    core = server_core(control_frame_timeout_s=30.0)  # whole frames, however slowly, are fine
    for i in range(5):
        core.handle_event(StreamDataReceived(hb, False, CONTROL), now=20.0 * i)
    assert core.expire(now=200.0) == []


def test_a_stream_that_never_finishes_expires(server_core) -> None:  # type: ignore[no-untyped-def]
    core = server_core(stream_timeout_s=30.0)
    core.handle_event(StreamDataReceived(bulk_frame(100)[:40], False, uni(0)), now=100.0)
    assert core.expire(now=129.0) == []
    [ev] = core.expire(now=131.0)
    assert isinstance(ev, ProtocolViolation) and ev.error.code is ErrorCode.TIMEOUT


def test_stream_ending_inside_a_frame_and_second_frame_on_bulk_stream(server_core) -> None:  # type: ignore[no-untyped-def]
    core = server_core()
    [ev] = core.handle_event(StreamDataReceived(bulk_frame(10)[:-3], True, uni(0)), 0.0)
    assert isinstance(ev, ProtocolViolation) and ev.error.code is ErrorCode.MALFORMED_FRAME
    core = server_core()
    events = core.handle_event(StreamDataReceived(bulk_frame(10) + bulk_frame(10), False, uni(0)), 0.0)
    assert isinstance(events[-1], ProtocolViolation)


def test_resets_and_close_become_our_events(server_core) -> None:  # type: ignore[no-untyped-def]
    core = server_core()
    core.handle_event(StreamDataReceived(bulk_frame(100)[:40], False, uni(0)), 0.0)
    [ev] = core.handle_event(StreamReset(error_code=7, stream_id=uni(0)), 0.0)
    assert ev == StreamAborted(uni(0), 7) and core.buffered_bytes() == 0
    [ev] = core.handle_event(ConnectionTerminated(error_code=0x105, frame_type=None, reason_phrase="bye"), 0.0)
    assert ev == PeerClosed(0x105, "bye")


def test_before_the_handshake_only_hello_and_heartbeat_are_accepted(server_core) -> None:  # type: ignore[no-untyped-def]
    from fedquic.common.messages import SUPPORTED_VERSIONS, Ack, Heartbeat, Hello, MsgType
    from fedquic.transport.connection import MessageReceived, ProtocolViolation
    from fedquic.transport.framing import encode_frame

    hello = Hello(versions=SUPPORTED_VERSIONS, client_id="c", base_fingerprint="ab", num_samples=1)
    core = server_core(established=False)
    data = encode_frame(hello) + encode_frame(Heartbeat(seq=1))
    out = core.handle_event(StreamDataReceived(data=data, end_stream=False, stream_id=0), 0.0)
    assert [type(e) for e in out] == [MessageReceived, MessageReceived]
    out = core.handle_event(
        StreamDataReceived(data=encode_frame(Ack(ref=MsgType.UPDATE, round=1)), end_stream=False, stream_id=0), 0.0
    )
    [violation] = out
    assert isinstance(violation, ProtocolViolation) and violation.error.code is ErrorCode.UNEXPECTED_MESSAGE
