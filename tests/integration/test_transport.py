"""Transport over real loopback QUIC: large-message integrity, concurrent bulk streams, and control messages
that do not queue behind a bulk transfer."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from fedquic.common.codec import Manifest
from fedquic.common.messages import Ack, Aggregate, Heartbeat, MsgType
from fedquic.transport.aio import FedQuicServer, Peer, connect_peer
from fedquic.transport.connection import BulkPermit
from fedquic.transport.pki import DevPki, issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

pytestmark = pytest.mark.usefixtures("quic_backend")  # each test once per QUIC backend

SETTINGS = TransportSettings()


def bulk(body: bytes, round_: int = 0) -> Aggregate:
    return Aggregate(round=round_, contributors=0, manifest=Manifest(tensors=(), raw_size=len(body)))


async def start_echo(pki: DevPki) -> tuple[FedQuicServer, int]:
    """Acks every bulk message with the SHA-256 of its body, and every heartbeat at once."""

    async def handler(peer: Peer) -> None:
        while True:
            msg = await peer.recv()
            if msg.type is MsgType.AGGREGATE:
                digest = hashlib.sha256(msg.body).hexdigest()[:32]
                peer.send(Ack(ref=MsgType.AGGREGATE, round=msg.header.round, state_hash=digest))
            elif msg.type is MsgType.HEARTBEAT:
                peer.send(Ack(ref=MsgType.HEARTBEAT, round=msg.header.seq))

    tls = TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key)
    # a transport test, not a job: bulk transfers are allowed from the start
    server = FedQuicServer(
        SETTINGS, tls, handler, bulk_permits=lambda: {MsgType.AGGREGATE: BulkPermit(max_body=1 << 30)}
    )
    return server, await server.start("127.0.0.1", 0)


async def open_control(peer: Peer) -> None:
    """The control stream exists once the client sends on it (HELLO, in the real protocol)."""
    peer.send(Heartbeat(seq=99))
    assert (await peer.recv(timeout=10)).type is MsgType.ACK


def client_tls(pki: DevPki) -> TlsFiles:
    cert, key = issue_client_cert(pki, "bulk-client")
    return TlsFiles(ca=pki.ca_cert, cert=cert, key=key)


async def test_64mb_message_arrives_intact(dev_pki: DevPki) -> None:
    server, port = await start_echo(dev_pki)
    body = os.urandom(64 << 20)
    try:
        async with connect_peer("127.0.0.1", port, SETTINGS, client_tls(dev_pki), "localhost") as peer:
            await open_control(peer)
            peaks: list[int] = []
            sampler = asyncio.ensure_future(sample_unacked(peer, peaks))
            await peer.send_bulk(bulk(body), body)
            ack = (await peer.recv(timeout=120)).header
            sampler.cancel()
    finally:
        await server.close()
    assert isinstance(ack, Ack) and ack.state_hash == hashlib.sha256(body).hexdigest()[:32]
    # backpressure: aioquic never holds more than the budget (plus one chunk) of unacknowledged data
    budget = SETTINGS.max_unacked_per_connection + SETTINGS.bulk_chunk_bytes
    assert 0 < max(peaks) <= budget, (max(peaks), budget)


async def sample_unacked(peer: Peer, peaks: list[int]) -> None:
    while True:
        peaks.append(peer.core.unacked_bytes())
        await asyncio.sleep(0.002)


async def test_eight_concurrent_transfers_each_intact(dev_pki: DevPki) -> None:
    server, port = await start_echo(dev_pki)
    bodies = [os.urandom((1 << 20) + 7919 * i) for i in range(8)]
    try:
        async with connect_peer("127.0.0.1", port, SETTINGS, client_tls(dev_pki), "localhost") as peer:
            await open_control(peer)
            for i, b in enumerate(bodies):
                await peer.send_bulk(bulk(b, i), b)
            acks = [(await peer.recv(timeout=60)).header for _ in bodies]
    finally:
        await server.close()
    got = {a.round: a.state_hash for a in acks if isinstance(a, Ack)}
    assert got == {i: hashlib.sha256(b).hexdigest()[:32] for i, b in enumerate(bodies)}


async def test_control_messages_overtake_a_bulk_transfer(dev_pki: DevPki) -> None:
    """Heartbeats sent before the last chunk of a transfer is even written are answered before that transfer is
    acknowledged: the control stream never waits behind a bulk one (queued megabytes included)."""
    server, port = await start_echo(dev_pki)
    body = os.urandom(64 << 20)
    behind: list[int] = []  # heartbeats sent while the transfer is still being written
    order: list[str] = []
    try:
        async with connect_peer("127.0.0.1", port, SETTINGS, client_tls(dev_pki), "localhost") as peer:
            await open_control(peer)
            sending = asyncio.ensure_future(peer.send_bulk(bulk(body), body))  # paced by backpressure
            seq = 0
            while not sending.done():
                peer.send(Heartbeat(seq=seq))
                behind.append(seq)
                seq += 1
                await asyncio.sleep(0.005)
            await sending
            while "bulk" not in order:
                msg = (await peer.recv(timeout=120)).header
                assert isinstance(msg, Ack)
                order.append("bulk" if msg.ref is MsgType.AGGREGATE else f"heartbeat {msg.round}")
    finally:
        await server.close()
    assert len(behind) >= 3, "the transfer was too fast to send heartbeats during it"
    assert order[: len(behind)] == [f"heartbeat {i}" for i in behind] and order[-1] == "bulk", order


async def test_a_qh3_client_probes_up_to_large_datagrams_on_loopback(
    dev_pki: DevPki, quic_backend: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Path MTU probing (qh3): on loopback the upload moves in datagrams far above the 1350-byte start; with
    probing off (or on aioquic), none is larger than max_datagram_size."""
    from fedquic.transport.aio import peer_class
    from fedquic.transport.backend import get_backend

    cls = peer_class(get_backend(quic_backend))
    sizes: list[int] = []
    original = cls.datagram_received

    def record(self, data, addr):  # type: ignore[no-untyped-def]
        if not self._quic.configuration.is_client:
            sizes.append(len(data))
        original(self, data, addr)

    monkeypatch.setattr(cls, "datagram_received", record)
    server, port = await start_echo(dev_pki)
    body = os.urandom(4 << 20)
    largest = {}
    try:
        for probing in (True, False):
            sizes.clear()
            settings = TransportSettings(path_mtu_probing=probing)
            async with connect_peer("127.0.0.1", port, settings, client_tls(dev_pki), "localhost") as peer:
                await open_control(peer)
                await peer.send_bulk(bulk(body), body)
                ack = (await peer.recv(timeout=60)).header
                assert isinstance(ack, Ack) and ack.state_hash == hashlib.sha256(body).hexdigest()[:32]
            largest[probing] = max(sizes)
    finally:
        await server.close()
    assert largest[False] <= SETTINGS.max_datagram_size
    if quic_backend == "qh3":
        assert largest[True] > 8 * SETTINGS.max_datagram_size
    else:
        assert largest[True] <= SETTINGS.max_datagram_size
