"""Two in-memory QUIC connections, each wrapped in our sans-I/O core, joined by a lossy "network" of lists and a
fake clock (the style of aioquic's own tests/test_connection.py): handshake with mutual TLS, then messages
arrive whole and bit-exact although datagrams are dropped."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from fedquic.common.codec import Manifest
from fedquic.common.messages import Heartbeat, MsgType, Update
from fedquic.transport.connection import BulkPermit, ConnectionReady, FedQuicConnection, MessageReceived
from fedquic.transport.mtls import ClientCertVerifier
from fedquic.transport.pki import DevPki, init_dev_pki, issue_client_cert
from fedquic.transport.settings import ALPN

CLIENT_ADDR = ("1.2.3.4", 1234)
SERVER_ADDR = ("2.3.4.5", 4433)

UPDATE_FIELDS = {"round": 1, "client_id": "c", "num_samples": 1, "base_hash": "ab"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    pki = init_dev_pki(tmp_path_factory.mktemp("mem-pki"))
    issue_client_cert(pki, "mem-client")
    return pki


class Pair:
    def __init__(self, pki: DevPki, loss: float, seed: int, window: int | None = None) -> None:
        ccfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
        ccfg.load_verify_locations(cafile=str(pki.ca_cert))
        ccfg.load_cert_chain(str(pki.client_cert("mem-client")), str(pki.client_key("mem-client")))
        scfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        scfg.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        if window is not None:
            for cfg in (ccfg, scfg):
                cfg.max_data, cfg.max_stream_data = window, window // 2
        self.now = 0.0
        cq = QuicConnection(configuration=ccfg)
        sq = QuicConnection(
            configuration=scfg, original_destination_connection_id=cq.original_destination_connection_id
        )
        self.client = FedQuicConnection(cq)
        self.server = FedQuicConnection(sq, verifier=ClientCertVerifier(Path(pki.ca_cert)))
        self.server.permit(MsgType.UPDATE, BulkPermit(max_body=1 << 30))  # as after an UPLOAD_GRANT
        self.events: dict[str, list] = {"client": [], "server": []}
        self.rng = random.Random(seed)
        self.loss = loss
        self.dropped = 0
        cq.connect(SERVER_ADDR, now=self.now)

    def _deliver(self, src: FedQuicConnection, dst: FedQuicConnection, addr: tuple[str, int]) -> int:
        moved = 0
        for data, _ in src.quic.datagrams_to_send(now=self.now):
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
            moved = self._deliver(self.client, self.server, CLIENT_ADDR)
            moved += self._deliver(self.server, self.client, SERVER_ADDR)
            self._drain_events()
            if moved == 0:  # nothing in flight: jump the fake clock to the next timer
                timers = [t for t in (self.client.quic.get_timer(), self.server.quic.get_timer()) if t is not None]
                assert timers and self.now < max_time, "stalled"
                self.now = max(self.now, min(timers))
                for core in (self.client, self.server):
                    t = core.quic.get_timer()
                    if t is not None and t <= self.now:
                        core.quic.handle_timer(now=self.now)
                self._drain_events()

    def messages(self, side: str) -> list[MessageReceived]:
        return [e for e in self.events[side] if isinstance(e, MessageReceived)]


@pytest.mark.parametrize(("loss", "seed"), [(0.0, 0), (0.05, 1), (0.10, 2), (0.10, 3)])
def test_messages_arrive_bit_exact_through_datagram_loss(pki: DevPki, loss: float, seed: int) -> None:
    pair = Pair(pki, loss, seed)
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


@pytest.mark.parametrize("capped", [True, False])
def test_receive_windows_stay_bounded(pki: DevPki, capped: bool) -> None:
    """aioquic alone doubles its windows without bound; with our cap the peer's credit never exceeds them."""
    window = 256 << 10
    pair = Pair(pki, 0.0, 0, window=window)
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
        lim = pair.server.quic._local_max_data
        credit["conn"] = max(credit["conn"], lim.sent - lim.used)
        stream = pair.server.quic._streams.get(sid)
        if stream is not None:
            credit["stream"] = max(credit["stream"], stream.max_stream_data_local_sent - stream.receiver.highest_offset)
        return any(m.message.type is MsgType.UPDATE for m in pair.messages("server"))

    pair.run(done)
    [bulk] = [m for m in pair.messages("server") if m.message.type is MsgType.UPDATE]
    assert hashlib.sha256(bulk.message.body).digest() == hashlib.sha256(body).digest()
    if capped:
        assert credit["conn"] <= window and credit["stream"] <= window // 2
    else:
        assert credit["conn"] > 4 * window  # the unbounded growth the cap exists for
