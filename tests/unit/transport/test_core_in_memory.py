"""Two in-memory QUIC connections, each wrapped in our sans-I/O core, joined by a lossy "network" of lists and a
fake clock (the style of aioquic's own tests/test_connection.py): handshake with mutual TLS, then messages
arrive whole and bit-exact although datagrams are dropped. Each side runs either QUIC backend, in every pairing:
the client-authenticating TLS server that fedquic adds to qh3 (transport/qh3_tls.py) is checked against both
clients, including clients that cheat."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from fedquic.common.codec import Manifest
from fedquic.common.messages import Heartbeat, MsgType, Update
from fedquic.transport.backend import QuicBackend, get_backend, installed
from fedquic.transport.connection import (
    BulkPermit,
    ConnectionReady,
    FedQuicConnection,
    MessageReceived,
    PeerClosed,
    ProtocolViolation,
)
from fedquic.transport.mtls import ClientCertVerifier
from fedquic.transport.pki import DevPki, init_dev_pki, issue_client_cert
from fedquic.transport.settings import ALPN, TransportSettings

DATAGRAM = TransportSettings().max_datagram_size
CLIENT_ADDR = ("1.2.3.4", 1234)
SERVER_ADDR = ("2.3.4.5", 4433)

UPDATE_FIELDS = {"round": 1, "client_id": "c", "num_samples": 1, "base_hash": "ab"}


PAIRINGS = [("aioquic", "aioquic"), ("qh3", "qh3"), ("aioquic", "qh3"), ("qh3", "aioquic")]  # (client, server)


@pytest.fixture(params=PAIRINGS, ids=lambda p: f"{p[0]}-to-{p[1]}")
def backends(request: pytest.FixtureRequest) -> tuple[QuicBackend, QuicBackend]:
    for name in request.param:
        if not installed(name):
            pytest.skip(f"{name} is not installed")
    return get_backend(request.param[0]), get_backend(request.param[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    pki = init_dev_pki(tmp_path_factory.mktemp("mem-pki"))
    issue_client_cert(pki, "mem-client")
    return pki


class Pair:
    def __init__(
        self,
        pki: DevPki,
        loss: float,
        seed: int,
        window: int | None = None,
        *,
        backends: tuple[QuicBackend, QuicBackend],
        client_key: Path | None = None,
        client_cert: bool = True,
    ) -> None:
        cb, sb = backends
        # both at the adapter's default datagram size (TransportSettings.max_datagram_size)
        ccfg = cb.QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], server_name="localhost", max_datagram_size=DATAGRAM
        )
        ccfg.load_verify_locations(cafile=str(pki.ca_cert))
        if client_cert:
            key = client_key or pki.client_key("mem-client")
            ccfg.load_cert_chain(str(pki.client_cert("mem-client")), str(key))
        scfg = sb.QuicConfiguration(is_client=False, alpn_protocols=[ALPN], max_datagram_size=DATAGRAM)
        scfg.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        if window is not None:
            for cfg in (ccfg, scfg):
                cfg.max_data, cfg.max_stream_data = window, window // 2
        self.now = 0.0
        cq = cb.QuicConnection(configuration=ccfg)
        sq = sb.QuicConnection(
            configuration=scfg, original_destination_connection_id=cq.original_destination_connection_id
        )
        self.client = FedQuicConnection(cq)
        self.server = FedQuicConnection(sq, verifier=ClientCertVerifier(Path(pki.ca_cert)))
        self.server.permit(MsgType.UPDATE, BulkPermit(max_body=1 << 30))  # as after an UPLOAD_GRANT
        self.events: dict[str, list] = {"client": [], "server": []}
        self.rng = random.Random(seed)
        self.loss = loss
        self.dropped = 0
        self.client_to_server_cut = False
        self.send_failures = 0
        cq.connect(SERVER_ADDR, now=self.now)

    def _deliver(self, src: FedQuicConnection, dst: FedQuicConnection, addr: tuple[str, int]) -> int:
        moved = 0
        try:
            datagrams = src.quic.datagrams_to_send(now=self.now)
        except src.backend.ConnectionError:  # qh3 under its anti-amplification limit: as the adapter, go on
            self.send_failures += 1
            return 0
        for data, _ in datagrams:
            moved += 1
            if self.rng.random() < self.loss:
                self.dropped += 1
                continue
            dst.quic.receive_datagram(data, addr, now=self.now)
        return moved

    def _drain_events(self) -> None:
        for name, core in (("client", self.client), ("server", self.server)):
            while (ev := core.quic.next_event()) is not None:
                self.events[name] += core.handle_event(ev, self.now)

    def run(self, until, max_time: float = 120.0) -> None:  # type: ignore[no-untyped-def]
        while not until():
            if self.client_to_server_cut:
                self.client.quic.datagrams_to_send(now=self.now)  # sent, and lost
            moved = 0 if self.client_to_server_cut else self._deliver(self.client, self.server, CLIENT_ADDR)
            moved += self._deliver(self.server, self.client, SERVER_ADDR)
            self._drain_events()
            if moved == 0:  # nothing in flight: jump the fake clock to the next timer
                timers = [t for t in (self.client.quic.get_timer(), self.server.quic.get_timer()) if t is not None]
                assert self.now < max_time, "stalled"
                if not timers:
                    return  # both sides are done (closed)
                self.now = max(self.now, min(timers))
                for core in (self.client, self.server):
                    t = core.quic.get_timer()
                    if t is not None and t <= self.now:
                        core.quic.handle_timer(now=self.now)
                self._drain_events()

    def messages(self, side: str) -> list[MessageReceived]:
        return [e for e in self.events[side] if isinstance(e, MessageReceived)]


@pytest.mark.parametrize(("loss", "seed"), [(0.0, 0), (0.05, 1), (0.10, 2), (0.10, 3)])
def test_messages_arrive_bit_exact_through_datagram_loss(
    pki: DevPki, loss: float, seed: int, backends: tuple[QuicBackend, QuicBackend]
) -> None:
    if loss and backends[0].name == "aioquic" and backends[1].name == "qh3":
        # Known qh3 2.1 limit: under its anti-amplification limit (no Retry has validated the address: this pair
        # has none) it raises instead of sending less, and a lost packet then stalls the handshake. The adapter
        # runs with Retry on by default; FedQuicServer warns when a qh3 server runs without it.
        pytest.skip("qh3 server without Retry, aioquic client, lossy path: a known qh3 2.1 stall")
    pair = Pair(pki, loss, seed, backends=backends)
    pair.run(lambda: any(isinstance(e, ConnectionReady) for e in pair.events["server"]))
    [ready] = [e for e in pair.events["server"] if isinstance(e, ConnectionReady)]
    assert ready.identity is not None and ready.identity.client_id == "mem-client"

    body = random.Random(seed).randbytes(300_000)
    pair.client.send_control(Heartbeat(seq=1))
    sid = pair.client.open_bulk(Update(**UPDATE_FIELDS, manifest=Manifest(tensors=(), raw_size=len(body))), len(body))
    pair.client.write_bulk(sid, body, end=True)
    pair.client.send_control(Heartbeat(seq=2))
    pair.run(lambda: len(pair.messages("server")) == 3)

    msgs = pair.messages("server")
    assert sorted(m.message.type for m in msgs) == [MsgType.UPDATE, MsgType.HEARTBEAT, MsgType.HEARTBEAT]
    [bulk] = [m for m in msgs if m.message.type is MsgType.UPDATE]
    assert hashlib.sha256(bulk.message.body).digest() == hashlib.sha256(body).digest()
    assert not bulk.on_control and all(m.on_control for m in msgs if m is not bulk)
    if loss:
        assert pair.dropped > 0  # the loss really happened, and QUIC recovered from it


def _aioquic_credit(pair: Pair, sid: int) -> dict[str, int]:
    """The credit the aioquic server has advertised beyond what it received (connection, stream)."""
    server = pair.server.quic
    lim = server._local_max_data
    stream = server._streams.get(sid)
    return {
        "conn": lim.sent - lim.used,
        "stream": 0 if stream is None else stream.max_stream_data_local_sent - stream.receiver.highest_offset,
    }


@pytest.mark.parametrize("capped", [True, False])
def test_receive_windows_stay_bounded_aioquic(pki: DevPki, capped: bool) -> None:
    """aioquic alone doubles its windows without bound; with our cap the peer's credit never exceeds them."""
    window = 256 << 10
    aioquic = get_backend("aioquic")
    pair = Pair(pki, 0.0, 0, window=window, backends=(aioquic, aioquic))
    if not capped:  # drop the per-connection wrappers: aioquic's own doubling
        for core in (pair.client, pair.server):
            del core.quic._write_connection_limits
            del core.quic._write_stream_limits
    pair.run(lambda: any(isinstance(e, ConnectionReady) for e in pair.events["server"]))
    body = random.Random(7).randbytes(8 << 20)
    sid = pair.client.open_bulk(Update(**UPDATE_FIELDS, manifest=Manifest(tensors=(), raw_size=len(body))), len(body))
    pair.client.write_bulk(sid, body, end=True)
    credit = {"conn": 0, "stream": 0}

    def done() -> bool:
        for k, v in _aioquic_credit(pair, sid).items():
            credit[k] = max(credit[k], v)
        return any(m.message.type is MsgType.UPDATE for m in pair.messages("server"))

    pair.run(done)
    [bulk] = [m for m in pair.messages("server") if m.message.type is MsgType.UPDATE]
    assert hashlib.sha256(bulk.message.body).digest() == hashlib.sha256(body).digest()
    if capped:
        assert credit["conn"] <= window and credit["stream"] <= window // 2
    else:
        assert credit["conn"] > 4 * window  # the unbounded growth the cap exists for


def test_a_qh3_server_never_lets_a_sender_run_ahead_of_its_window(pki: DevPki) -> None:
    """qh3's windows slide at their configured size (no cap needed): cut the client off mid-transfer, and it has
    sent at most one stream window beyond what the server had received, however long it keeps trying."""
    window = 256 << 10
    qh3 = get_backend("qh3") if installed("qh3") else pytest.skip("qh3 is not installed")
    pair = Pair(pki, 0.0, 0, window=window, backends=(qh3, qh3))
    pair.run(lambda: any(isinstance(e, ConnectionReady) for e in pair.events["server"]))
    body = random.Random(7).randbytes(8 << 20)
    sid = pair.client.open_bulk(Update(**UPDATE_FIELDS, manifest=Manifest(tensors=(), raw_size=len(body))), len(body))
    written = pair.client.quic.get_send_buffer_size(sid)  # the frame's head and the body, none of it sent yet
    pair.client.write_bulk(sid, body, end=True)
    written = pair.client.quic.get_send_buffer_size(sid)
    received = 0
    original = pair.server.handle_event

    def count(event, now):  # type: ignore[no-untyped-def]
        nonlocal received
        received += len(getattr(event, "data", b""))
        return original(event, now)

    pair.server.handle_event = count  # type: ignore[method-assign]
    pair.run(lambda: received >= 4 << 20)
    pair.client_to_server_cut = True
    stop = pair.now + 5.0  # retransmission timers fire meanwhile; new data must not go out
    pair.run(lambda: pair.now >= stop, max_time=stop + 1.0)
    sent = written - pair.client.quic.get_send_buffer_size(sid)
    assert received < sent <= received + window // 2


def _handshake_outcome(pair: Pair) -> tuple[list[ConnectionReady], list[object]]:
    pair.run(
        lambda: (
            any(isinstance(e, ConnectionReady | PeerClosed | ProtocolViolation) for e in pair.events["server"])
            or any(isinstance(e, PeerClosed) for e in pair.events["client"])
        ),
        max_time=60.0,
    )
    ready = [e for e in pair.events["server"] if isinstance(e, ConnectionReady)]
    return ready, [e for e in pair.events["server"] if isinstance(e, PeerClosed | ProtocolViolation)]


@pytest.fixture
def qh3_server(backends: tuple[QuicBackend, QuicBackend]) -> tuple[QuicBackend, QuicBackend]:
    if backends[1].name != "qh3":
        pytest.skip("a check of the client authentication fedquic adds to qh3's TLS server")
    return backends


def test_a_client_whose_key_is_not_its_certificates_never_gets_in(
    pki: DevPki, qh3_server: tuple[QuicBackend, QuicBackend]
) -> None:
    """Its CertificateVerify cannot match the certificate's public key: the TLS handshake fails."""
    _, other_key = issue_client_cert(pki, "mem-other")
    pair = Pair(pki, 0.0, 0, backends=qh3_server, client_key=other_key)
    ready, closed = _handshake_outcome(pair)
    assert not any(e.identity is not None for e in ready)
    assert closed or any(isinstance(e, PeerClosed) for e in pair.events["client"])


def test_a_client_that_answers_a_certificate_request_with_nothing_never_gets_in(
    pki: DevPki, qh3_server: tuple[QuicBackend, QuicBackend]
) -> None:
    """A client that skips its Certificate (straight to Finished) is refused by the TLS server."""
    pair = Pair(pki, 0.0, 0, backends=qh3_server)
    ctx = pair.client.quic.tls
    original = ctx._client_handle_certificate_request

    def ignore_request(input_buf):  # type: ignore[no-untyped-def]
        original(input_buf)  # read it into the transcript, then act as if it had never come
        ctx._certificate_request = None

    ctx._client_handle_certificate_request = ignore_request
    ready, closed = _handshake_outcome(pair)
    assert not ready
    assert closed or any(isinstance(e, PeerClosed) for e in pair.events["client"])


def test_a_client_without_a_certificate_completes_tls_but_is_refused_by_the_verifier(
    pki: DevPki, qh3_server: tuple[QuicBackend, QuicBackend]
) -> None:
    pair = Pair(pki, 0.0, 0, backends=qh3_server, client_cert=False)
    ready, closed = _handshake_outcome(pair)
    assert not ready
    [violation] = [e for e in closed if isinstance(e, ProtocolViolation)]
    assert "no certificate" in str(violation.error)
