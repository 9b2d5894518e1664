"""Transport over real loopback QUIC: large-message integrity, concurrent bulk streams, and control messages
that do not queue behind a bulk transfer."""

from __future__ import annotations

import asyncio
import hashlib
import os

from fedquic.common.codec import Manifest
from fedquic.common.messages import Ack, Aggregate, Heartbeat, MsgType
from fedquic.transport.aio import FedQuicServer, Peer, connect_peer
from fedquic.transport.connection import BulkPermit
from fedquic.transport.pki import DevPki, issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

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
    """Heartbeats sent after a 32 MB transfer started are answered before that transfer is acknowledged."""
    server, port = await start_echo(dev_pki)
    body = os.urandom(32 << 20)
    order: list[str] = []
    try:
        async with connect_peer("127.0.0.1", port, SETTINGS, client_tls(dev_pki), "localhost") as peer:
            await open_control(peer)
            sending = asyncio.ensure_future(peer.send_bulk(bulk(body), body))  # paced by backpressure
            for seq in range(5):
                await asyncio.sleep(0.05)
                peer.send(Heartbeat(seq=seq))
            await sending
            while "bulk" not in order:
                msg = (await peer.recv(timeout=120)).header
                assert isinstance(msg, Ack)
                order.append("bulk" if msg.ref is MsgType.AGGREGATE else "heartbeat")
    finally:
        await server.close()
    assert order.count("heartbeat") == 5 and order[-1] == "bulk", order
