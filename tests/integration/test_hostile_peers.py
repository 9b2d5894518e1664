"""Hostile peers over real loopback QUIC against the real server: each attack is refused with its error code, and a
well-behaved client in the same round is not affected (its update is accepted, the round completes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from fedquic.common.adapter import init_lora_state, state_hash
from fedquic.common.codec import EncodingSpec, Manifest, encode_payload, to_compact
from fedquic.common.errors import ErrorCode, TransportError
from fedquic.common.limits import WireLimits
from fedquic.common.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Error,
    Heartbeat,
    Hello,
    Join,
    Metrics,
    MsgType,
    RoundStart,
    Update,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from fedquic.server.config import JobConfig, MetricsSettings, ServerConfig
from fedquic.server.daemon import AggregationServer
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.aio import Peer, connect_peer
from fedquic.transport.framing import encode_frame_head
from fedquic.transport.pki import DevPki, issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

from testkit.synthetic import lora_schema

pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("quic_backend")]  # each test once per QUIC backend

SCHEMA = lora_schema(layers=1, dim=32, rank=2)
FP32 = EncodingSpec.parse("fp32")


@contextlib.asynccontextmanager
async def job_server(pki: DevPki, tmp_path: Path) -> AsyncIterator[AggregationServer]:
    limits = WireLimits(max_body_bytes=1 << 20, max_open_streams=4, stream_timeout_s=1.0)
    server = AggregationServer(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
            transport=TransportSettings(limits=limits),
            policy=RoundPolicy(rounds=1, min_clients=2, round_timeout_s=60),
            job=JobConfig(uplink=FP32),
            metrics=MetricsSettings(enabled=False),
            run_dir=tmp_path / "server",
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def joined(pki: DevPki, port: int, cid: str) -> AsyncIterator[Peer]:
    cert, key = issue_client_cert(pki, cid)
    tls = TlsFiles(ca=pki.ca_cert, cert=cert, key=key)
    async with connect_peer("127.0.0.1", port, TransportSettings(connect_timeout_s=5), tls, "localhost") as peer:
        peer.send(Hello(versions=SUPPORTED_VERSIONS, client_id=cid, base_fingerprint="ab", num_samples=10))
        assert isinstance((await peer.recv(timeout=5)).header, Welcome)
        peer.send(Join(adapter=SCHEMA))
        ack = (await peer.recv(timeout=5)).header
        assert isinstance(ack, Ack) and ack.ref is MsgType.JOIN
        yield peer


async def next_of(peer: Peer, kind: type, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    while True:
        msg = await peer.recv(timeout=timeout)
        if isinstance(msg.header, (kind, Error)):
            return msg.header


def update(cid: str, round_: int, delta: dict[str, np.ndarray], base: str) -> tuple[Update, bytes]:
    p = encode_payload(delta, FP32)
    return Update(round=round_, client_id=cid, num_samples=10, base_hash=base, manifest=p.manifest), p.body


INIT = init_lora_state(SCHEMA, 0)
INIT_HASH = state_hash(INIT)


def small_delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in INIT.items()}


async def expect_error(peer: Peer, code: ErrorCode) -> None:
    h = await next_of(peer, Ack)
    assert isinstance(h, Error) and h.code == code, h


async def request_grant(peer: Peer, round_: int, nbytes: int) -> UploadGrant | Error:
    """UPLOAD_REQUEST, then the server's answer: its UPLOAD_GRANT, or an ERROR refusing the request."""
    peer.send(UploadRequest(round=round_, nbytes=nbytes))
    h = await next_of(peer, UploadGrant)
    assert isinstance(h, Error) or h.round == round_, h
    return h


async def send_granted(peer: Peer, header: Update, body: bytes) -> None:
    """Send an UPDATE the way the protocol requires: request a slot for its body, await the grant, then send."""
    grant = await request_grant(peer, header.round, len(body))
    assert isinstance(grant, UploadGrant), grant
    await peer.send_bulk(header, body)


def open_partial_metrics(peer: Peer) -> int:
    """Open a METRICS stream (permitted after JOIN) and leave its frame one byte short of complete."""
    head = encode_frame_head(Metrics(round=1, values={"loss": 0.5}), 0)
    sid = peer.core.quic.get_next_available_stream_id(is_unidirectional=True)
    peer.core.quic.send_stream_data(sid, head[:-1], end_stream=False)
    return sid


async def good_client_completes(peer: Peer, cid: str) -> None:
    rs = await next_of(peer, RoundStart)
    assert isinstance(rs, RoundStart)
    header, body = update(cid, rs.round, small_delta(1), INIT_HASH)
    await send_granted(peer, header, body)
    ack = await next_of(peer, Ack)
    assert isinstance(ack, Ack) and ack.ref is MsgType.UPDATE


async def test_update_level_attacks_are_refused_per_message(dev_pki, tmp_path: Path) -> None:
    async with job_server(dev_pki, tmp_path) as server, joined(dev_pki, server.port, "bad") as bad:
        # before any round is open: refused at the UPLOAD_REQUEST (no grant, so no UPDATE stream may follow)
        refused = await request_grant(bad, 5, 100)
        assert isinstance(refused, Error) and refused.code == ErrorCode.ROUND_NOT_OPEN, refused
        async with joined(dev_pki, server.port, "good") as good:
            rs = await next_of(bad, RoundStart)
            assert isinstance(rs, RoundStart) and rs.round == 1
            # NaN in the tensor data
            raw = encode_payload(small_delta(2), EncodingSpec.parse("fp32+nolz4"))  # our encoder refuses NaN
            body = bytearray(raw.body)
            body[0:4] = np.array([np.nan], dtype="<f4").tobytes()
            nan_update = Update(round=1, client_id="bad", num_samples=1, base_hash=INIT_HASH, manifest=raw.manifest)
            await send_granted(bad, nan_update, bytes(body))
            await expect_error(bad, ErrorCode.NON_FINITE)
            # wrong shapes (a schema the job does not have)
            wrong = {k: np.zeros((v.shape[0] + 1, *v.shape[1:]), np.float32) for k, v in INIT.items()}
            await send_granted(bad, *update("bad", 1, wrong, INIT_HASH))
            await expect_error(bad, ErrorCode.SCHEMA_MISMATCH)
            # compact manifests: written for another schema, and with a k larger than its tensor
            sparse = encode_payload(small_delta(7), EncodingSpec.parse("topk10"))
            compact = to_compact(sparse.manifest, SCHEMA)
            assert compact is not None and compact.k is not None
            h, _ = update("bad", 1, small_delta(7), INIT_HASH)
            await send_granted(
                bad, h.model_copy(update={"manifest": compact.model_copy(update={"fp": "0" * 16})}), sparse.body
            )
            await expect_error(bad, ErrorCode.SCHEMA_MISMATCH)
            too_many = compact.model_copy(update={"k": (10**6, *compact.k[1:])})
            await send_granted(bad, h.model_copy(update={"manifest": too_many}), sparse.body)
            await expect_error(bad, ErrorCode.BAD_TENSOR)
            # an "LZ4 bomb": a manifest claiming more raw bytes than the body decompresses to
            h, b = update("bad", 1, small_delta(3), INIT_HASH)
            bomb = encode_payload(small_delta(3), EncodingSpec.parse("fp32"))
            man = Manifest(tensors=bomb.manifest.tensors, compression=bomb.manifest.compression, raw_size=1 << 19)
            await send_granted(bad, h.model_copy(update={"manifest": man}), bomb.body)
            h_err = await next_of(bad, Ack)
            assert isinstance(h_err, Error) and h_err.code in (ErrorCode.DECOMPRESSION, ErrorCode.BAD_TENSOR)
            # a valid update, then its identical resend (after a "lost ACK"), then a conflicting one
            h, b = update("bad", 1, small_delta(4), INIT_HASH)
            await send_granted(bad, h, b)
            first = await next_of(bad, Ack)
            await send_granted(bad, h, b)
            again = await next_of(bad, Ack)
            assert isinstance(first, Ack) and isinstance(again, Ack) and again.state_hash == first.state_hash
            await send_granted(bad, *update("bad", 1, small_delta(5), INIT_HASH))
            await expect_error(bad, ErrorCode.CONFLICTING_UPDATE)
            # an UPDATE naming another client on this connection
            await send_granted(bad, *update("good", 1, small_delta(6), INIT_HASH))
            await expect_error(bad, ErrorCode.IDENTITY_MISMATCH)
            # nothing of this touched the well-behaved client
            await good_client_completes(good, "good")
        assert server.metrics.rejected.get("CONFLICTING_UPDATE") == 1
        assert server.records["good"].view_hash != INIT_HASH


@pytest.mark.parametrize(
    "attack",
    ["oversized-frame", "over-body-limit", "ungranted-update", "update-on-control", "stream-flood", "slowloris"],
)
async def test_connection_level_attacks_close_only_the_attacker(dev_pki, tmp_path: Path, attack: str) -> None:
    async with job_server(dev_pki, tmp_path) as server, joined(dev_pki, server.port, "good") as good:
        async with joined(dev_pki, server.port, "bad") as bad:
            manifest = Manifest(tensors=(), raw_size=0)
            header = Update(round=1, client_id="bad", num_samples=1, base_hash=INIT_HASH, manifest=manifest)
            if attack == "oversized-frame":  # granted 1000 bytes, declares more (under the 1 MiB body limit)
                rs = await next_of(bad, RoundStart)
                assert isinstance(rs, RoundStart) and rs.round == 1
                assert isinstance(await request_grant(bad, 1, 1000), UploadGrant)
                bad.core.open_bulk(header, 1001)
                code = ErrorCode.LIMIT_EXCEEDED
            elif attack == "over-body-limit":
                bad.core.open_bulk(header, 1 << 30)  # declares 1 GiB: above the server's 1 MiB body limit
                code = ErrorCode.LIMIT_EXCEEDED
            elif attack == "ungranted-update":  # an UPDATE stream no UPLOAD_GRANT allows: refused at its prefix
                bad.core.open_bulk(header, 1000)
                code = ErrorCode.UNEXPECTED_MESSAGE
            elif attack == "update-on-control":  # a bulk message on the control stream
                bad.core.send_control(header)
                code = ErrorCode.UNEXPECTED_MESSAGE
            elif attack == "stream-flood":
                for _ in range(8):  # more unfinished bulk streams than max_open_streams (4)
                    open_partial_metrics(bad)
                code = ErrorCode.LIMIT_EXCEEDED
            else:  # slowloris: a frame that never finishes
                open_partial_metrics(bad)
                code = ErrorCode.TIMEOUT
            bad.transmit()
            with pytest.raises(TransportError):
                while True:
                    msg = await bad.recv(timeout=10)
                    if isinstance(msg.header, Error):
                        assert msg.header.code == code, msg.header
            assert bad.close_code == 0x100 + int(code)
        # the attacker is gone; the round is still open for the good client, who is unaffected
        for _ in range(100):  # the server notices the closed connection on its own schedule
            if "bad" not in server.clients:
                break
            await asyncio.sleep(0.05)
        good.send(Heartbeat(seq=1))
        assert "good" in server.clients and "bad" not in server.clients
        await good_client_completes(good, "good")  # it trains round 1 alone: the attacker left the sample
        assert server.metrics.rejected.get(code.name, 0) >= 1
