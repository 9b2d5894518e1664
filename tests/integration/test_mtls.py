"""Mutual TLS over real loopback QUIC: only clients with a valid certificate from our CA get in, and the
id they claim in HELLO must be the one in their certificate."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from fedquic.common.errors import ErrorCode, TransportError
from fedquic.common.messages import SUPPORTED_VERSIONS, Ack, Error, Hello, MsgType
from fedquic.server.config import ServerConfig
from fedquic.server.daemon import AggregationServer
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.aio import FedQuicServer, Peer, connect_peer
from fedquic.transport.pki import DevPki, init_dev_pki, issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

pytestmark = pytest.mark.usefixtures("quic_backend")  # each test once per QUIC backend

SETTINGS = TransportSettings(connect_timeout_s=5)


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return init_dev_pki(tmp_path / "pki")


async def echo_server(pki: DevPki, identities: list, revoked: Path | None = None) -> tuple[FedQuicServer, int]:
    async def handler(peer: Peer) -> None:
        identities.append(peer.identity)
        msg = await peer.recv()
        peer.send(Ack(ref=msg.type, round=0))
        await peer.recv()  # until the client goes away

    tls = TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key, revoked=revoked)
    server = FedQuicServer(SETTINGS, tls, handler)
    return server, await server.start("127.0.0.1", 0)


async def hello_roundtrip(port: int, tls: TlsFiles, client_id: str = "edge-1") -> None:
    async with connect_peer("127.0.0.1", port, SETTINGS, tls, server_name="localhost") as peer:
        peer.send(Hello(versions=SUPPORTED_VERSIONS, client_id=client_id, base_fingerprint="ab", num_samples=1))
        msg = await peer.recv(timeout=5)
        assert msg.type is MsgType.ACK


async def test_valid_client_certificate_is_accepted_and_identified(pki: DevPki) -> None:
    identities: list = []
    server, port = await echo_server(pki, identities)
    cert, key = issue_client_cert(pki, "edge-1")
    try:
        await hello_roundtrip(port, TlsFiles(ca=pki.ca_cert, cert=cert, key=key))
    finally:
        await server.close()
    assert [i.client_id for i in identities] == ["edge-1"]


def refused_cases(pki: DevPki, tmp_path: Path) -> dict[str, TlsFiles]:
    other = init_dev_pki(tmp_path / "other-ca")
    wrong_cert, wrong_key = issue_client_cert(other, "edge-1")
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    expired_cert, expired_key = issue_client_cert(pki, "edge-old", days=1, start=old)
    return {
        "no certificate": TlsFiles(ca=pki.ca_cert),
        "wrong CA": TlsFiles(ca=pki.ca_cert, cert=wrong_cert, key=wrong_key),
        "expired": TlsFiles(ca=pki.ca_cert, cert=expired_cert, key=expired_key),
        "server certificate as client": TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
    }


@pytest.mark.parametrize("case", ["no certificate", "wrong CA", "expired", "server certificate as client"])
async def test_bad_client_certificates_are_refused(pki: DevPki, tmp_path: Path, case: str) -> None:
    identities: list = []
    server, port = await echo_server(pki, identities)
    try:
        with pytest.raises(TransportError) as ei:
            await hello_roundtrip(port, refused_cases(pki, tmp_path)[case])
    finally:
        await server.close()
    assert ei.value.code is ErrorCode.CERTIFICATE, ei.value
    assert identities == []  # the handler never saw the connection


async def test_revoked_certificate_is_refused_without_a_restart(pki: DevPki) -> None:
    from fedquic.transport.pki import revoke_client_cert, revoked_file

    cert, key = issue_client_cert(pki, "edge-2")
    tls = TlsFiles(ca=pki.ca_cert, cert=cert, key=key)
    server, port = await echo_server(pki, [], revoked=revoked_file(pki))
    try:
        await hello_roundtrip(port, tls, "edge-2")  # accepted
        revoke_client_cert(pki, "edge-2")  # the running server re-reads the list
        with pytest.raises(TransportError) as ei:
            await hello_roundtrip(port, tls, "edge-2")
    finally:
        await server.close()
    assert ei.value.code is ErrorCode.CERTIFICATE and "revoked" in str(ei.value)


async def test_hello_claiming_another_id_is_refused(pki: DevPki, tmp_path: Path) -> None:
    server = AggregationServer(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
            policy=RoundPolicy(min_clients=2),
            run_dir=tmp_path / "server",
        )
    )
    port = await server.start()
    cert, key = issue_client_cert(pki, "edge-1")
    try:
        async with connect_peer(
            "127.0.0.1", port, SETTINGS, TlsFiles(ca=pki.ca_cert, cert=cert, key=key), server_name="localhost"
        ) as peer:
            peer.send(Hello(versions=SUPPORTED_VERSIONS, client_id="edge-9", base_fingerprint="ab", num_samples=1))
            msg = await peer.recv(timeout=5)
            assert isinstance(msg.header, Error) and msg.header.code == ErrorCode.IDENTITY_MISMATCH
            with pytest.raises(TransportError):
                await peer.recv(timeout=5)  # and the server hangs up
    finally:
        await server.close()
    assert server.clients == {}
    await asyncio.sleep(0)


async def test_a_new_connection_with_the_same_certificate_replaces_a_stale_one(pki: DevPki, tmp_path: Path) -> None:
    from fedquic.common.messages import Join, Welcome
    from fedquic.server.config import MetricsSettings

    from testkit.synthetic import lora_schema

    server = AggregationServer(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
            policy=RoundPolicy(min_clients=2),
            metrics=MetricsSettings(enabled=False),
            run_dir=tmp_path / "server",
        )
    )
    port = await server.start()
    cert, key = issue_client_cert(pki, "edge-1")
    tls = TlsFiles(ca=pki.ca_cert, cert=cert, key=key)
    hello = Hello(versions=SUPPORTED_VERSIONS, client_id="edge-1", base_fingerprint="ab", num_samples=1)
    schema = lora_schema(1, 16, 2)
    try:
        async with connect_peer("127.0.0.1", port, SETTINGS, tls, server_name="localhost") as old:
            old.send(hello)
            assert isinstance((await old.recv(timeout=5)).header, Welcome)
            old.send(Join(adapter=schema))
            assert isinstance((await old.recv(timeout=5)).header, Ack)
            first = server.clients["edge-1"].peer
            # the client's network changed: it dials again while the server still holds the old connection
            async with connect_peer("127.0.0.1", port, SETTINGS, tls, server_name="localhost") as new:
                new.send(hello)
                assert isinstance((await new.recv(timeout=5)).header, Welcome)
                new.send(Join(adapter=schema))
                ack = (await new.recv(timeout=5)).header
                assert isinstance(ack, Ack) and ack.ref is MsgType.JOIN
                assert server.clients["edge-1"].peer is not first
                with pytest.raises(TransportError):
                    await old.recv(timeout=5)  # the stale connection is closed by the server
    finally:
        await server.close()
