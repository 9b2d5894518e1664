"""Session resumption and 0-RTT over real loopback QUIC: tickets are single-use and carry the client identity;
0-RTT carries only HELLO/HEARTBEAT; a revoked certificate cannot come back through an old ticket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fedquic.common.errors import ErrorCode, TransportError
from fedquic.common.messages import SUPPORTED_VERSIONS, Ack, Error, Heartbeat, Hello, MsgType
from fedquic.transport import aio
from fedquic.transport.aio import FedQuicServer, Peer, connect_peer
from fedquic.transport.pki import DevPki, init_dev_pki, issue_client_cert, revoke_client_cert, revoked_file
from fedquic.transport.settings import TlsFiles, TransportSettings
from fedquic.transport.tickets import TicketJar

pytestmark = pytest.mark.usefixtures("quic_backend")  # each test once per QUIC backend

SETTINGS = TransportSettings(connect_timeout_s=5)
HELLO = Hello(versions=SUPPORTED_VERSIONS, client_id="edge-1", base_fingerprint="ab", num_samples=1)


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    pki = init_dev_pki(tmp_path / "pki")
    issue_client_cert(pki, "edge-1")
    return pki


async def start_server(pki: DevPki, seen: list[tuple[str, bool]]) -> tuple[FedQuicServer, int]:
    async def handler(peer: Peer) -> None:
        assert peer.identity is not None
        seen.append((peer.identity.client_id, peer.session_resumed))
        msg = await peer.recv()
        peer.send(Ack(ref=msg.type, round=0))
        await peer.recv()

    tls = TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key, revoked=revoked_file(pki))
    server = FedQuicServer(SETTINGS, tls, handler)
    return server, await server.start("127.0.0.1", 0)


def client_tls(pki: DevPki) -> TlsFiles:
    return TlsFiles(ca=pki.ca_cert, cert=pki.client_cert("edge-1"), key=pki.client_key("edge-1"))


async def session(port: int, pki: DevPki, jar: TicketJar, *, early: bool = True) -> Peer:
    async with connect_peer(
        "127.0.0.1", port, SETTINGS, client_tls(pki), "localhost", tickets=jar, early=[HELLO] if early else []
    ) as peer:
        msg = await peer.recv(timeout=5)
        assert msg.type is MsgType.ACK
        for _ in range(100):  # the server's ticket follows the handshake
            if len(jar):
                break
            await asyncio.sleep(0.02)
        return peer


async def test_reconnect_resumes_with_identity_and_0rtt_hello(pki: DevPki) -> None:
    seen: list[tuple[str, bool]] = []
    server, port = await start_server(pki, seen)
    jar = TicketJar()
    try:
        first = await session(port, pki, jar)
        assert not first.session_resumed and len(jar) == 1
        second = await session(port, pki, jar)
        assert second.session_resumed and second.early_data_accepted  # HELLO rode in 0-RTT data
        third = await session(port, pki, jar)  # the second connection earned a fresh ticket
        assert third.session_resumed
    finally:
        await server.close()
    assert seen == [("edge-1", False), ("edge-1", True), ("edge-1", True)]


async def test_a_ticket_is_single_use(pki: DevPki) -> None:
    seen: list[tuple[str, bool]] = []
    server, port = await start_server(pki, seen)
    jar = TicketJar()
    try:
        await session(port, pki, jar)
        ticket = jar.take("localhost")
        assert ticket is not None
        jar.store(ticket)
        assert (await session(port, pki, jar)).session_resumed
        jar.store(ticket)  # replay the same ticket: the server has spent it, so this is a full handshake
        replay = await session(port, pki, jar)
        assert not replay.session_resumed and not replay.early_data_accepted
    finally:
        await server.close()
    assert seen == [("edge-1", False), ("edge-1", True), ("edge-1", False)]


async def test_a_revoked_certificate_cannot_resume(pki: DevPki) -> None:
    seen: list[tuple[str, bool]] = []
    server, port = await start_server(pki, seen)
    jar = TicketJar()
    try:
        await session(port, pki, jar)
        revoke_client_cert(pki, "edge-1")
        with pytest.raises(TransportError):  # refused: an ERROR with the code, then the connection closes
            async with connect_peer(
                "127.0.0.1", port, SETTINGS, client_tls(pki), "localhost", tickets=jar, early=[HELLO]
            ) as peer:
                msg = await peer.recv(timeout=5)
                assert isinstance(msg.header, Error) and msg.header.code == ErrorCode.CERTIFICATE
                await peer.recv(timeout=5)
    finally:
        await server.close()
    assert seen == [("edge-1", False)]


async def test_only_hello_and_heartbeat_may_ride_in_0rtt(pki: DevPki, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="0-RTT"):
        async with connect_peer(
            "127.0.0.1", 9, SETTINGS, client_tls(pki), tickets=TicketJar(), early=[Ack(ref=MsgType.UPDATE, round=1)]
        ):
            pass
    seen: list[tuple[str, bool]] = []
    server, port = await start_server(pki, seen)
    jar = TicketJar()
    try:
        await session(port, pki, jar)
        # A client that ignores the rule (its own check patched out) is refused by the server.
        monkeypatch.setattr(aio, "EARLY_DATA_TYPES", frozenset(MsgType))
        with pytest.raises(TransportError):
            async with connect_peer(
                "127.0.0.1",
                port,
                SETTINGS,
                client_tls(pki),
                "localhost",
                tickets=jar,
                early=[Heartbeat(seq=1), Ack(ref=MsgType.UPDATE, round=1)],
            ) as peer:
                msg = await peer.recv(timeout=5)
                assert isinstance(msg.header, Error) and msg.header.code == ErrorCode.UNEXPECTED_MESSAGE
                await peer.recv(timeout=5)
    finally:
        await server.close()
    assert seen == [("edge-1", False)]
