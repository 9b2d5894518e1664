"""Fuzzing the receive path: the frame decoder, header parsing and tensor decoding behind a server-side connection
core, with deterministic mutations of valid frames. Every input must end in a message or a refusal with our error
code: no other exception, no input slower than a bound, and bounded memory. A second test throws fuzzed frames at a
live server over real QUIC while a well-behaved client completes its round."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import tracemalloc

import numpy as np
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived
from fedquic.common.adapter import init_lora_state
from fedquic.common.codec import EncodingSpec, decode_tensors, encode_payload, expand, to_compact
from fedquic.common.errors import FedQuicError
from fedquic.common.limits import WireLimits
from fedquic.common.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Aggregate,
    Heartbeat,
    Hello,
    Join,
    Metrics,
    MsgType,
    Update,
    UploadRequest,
)
from fedquic.transport.connection import BulkPermit, FedQuicConnection, MessageReceived, ProtocolViolation
from fedquic.transport.framing import encode_frame

from testkit.synthetic import lora_schema

pytestmark = pytest.mark.reliability

LIMITS = WireLimits(max_body_bytes=1 << 22, max_tensor_elements=1 << 20, max_total_elements=1 << 21)
SCHEMA = lora_schema(1, 16, 2)


def seeds() -> list[bytes]:
    state = init_lora_state(SCHEMA, 0)
    out = [
        encode_frame(Hello(versions=SUPPORTED_VERSIONS, client_id="c1", base_fingerprint="ab", num_samples=3)),
        encode_frame(Join(adapter=SCHEMA)),
        encode_frame(Heartbeat(seq=7)),
        encode_frame(Metrics(round=1, values={"loss": 0.5})),
        encode_frame(UploadRequest(round=1, nbytes=100)),
        encode_frame(Ack(ref=6, round=1, state_hash="ab")),  # type: ignore[arg-type]
    ]
    for i, spec in enumerate(("fp32", "int8", "int8-block8", "topk10", "topk10-fp16+nolz4", "fp16+nolz4")):
        p = encode_payload(state, EncodingSpec.parse(spec))
        compact = to_compact(p.manifest, SCHEMA)
        assert compact is not None
        # both manifest forms (the compact one senders use, the full one older peers send), alternating
        up, down = (compact, p.manifest) if i % 2 else (p.manifest, compact)
        out.append(encode_frame(Update(round=1, client_id="c1", num_samples=3, base_hash="ab", manifest=up), p.body))
        out.append(encode_frame(Aggregate(round=1, contributors=2, manifest=down), p.body))
    return out


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    op = rng.randrange(9)
    if op == 0 and b:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 2:  # insert random bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    elif op == 3 and len(b) >= 16:  # lie about the header or body length in the 16-byte prefix
        field = rng.choice([(4, 8), (8, 16)])
        value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, len(b) * 3])
        width = field[1] - field[0]
        b[field[0] : field[1]] = (value % (1 << (8 * width))).to_bytes(width, "big")
    elif op == 4:  # splice two frames
        other = rng.choice(pool)
        b = b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1) :]
    elif op == 5 and len(b) > 16:  # mutate a JSON value in the header
        hlen = int.from_bytes(b[4:8], "big")
        try:
            header = json.loads(bytes(b[16 : 16 + hlen]))
        except ValueError:
            header = None
        if isinstance(header, dict) and header:
            target = header
            if isinstance(header.get("manifest"), dict) and rng.random() < 0.5:  # reach into the manifest too
                target = header["manifest"]
            if target:
                key = rng.choice(list(target))
                target[key] = rng.choice([None, -1, 2**70, "x" * 5000, [], {}, 1e308, "NaN", [0] * 100, "b", 0])
            new = json.dumps(header).encode()
            b = b[:4] + len(new).to_bytes(4, "big") + b[8:16] + new + b[16 + hlen :]
    elif op == 6:
        b = bytearray(rng.randbytes(rng.randint(0, 300)))
    elif op == 7 and b:  # duplicate a chunk
        i = rng.randrange(len(b))
        b[i:i] = b[i : i + rng.randint(1, 256)]
    # op 8: unchanged (valid frames must keep working)
    return bytes(b)


@pytest.fixture(scope="module")
def server_config(dev_pki) -> QuicConfiguration:  # type: ignore[no-untyped-def]
    cfg = QuicConfiguration(is_client=False)
    cfg.load_cert_chain(str(dev_pki.server_cert), str(dev_pki.server_key))
    return cfg


CLIENT_CONFIG = QuicConfiguration(is_client=True)


def run_one(
    cfg: QuicConfiguration, data: bytes, stream_id: int, end: bool, rng: random.Random, *, client_side: bool = False
) -> str:
    """Feed ``data`` on ``stream_id`` to a connection core: a server's (``cfg``) or a client's.

    The server side is in the state of a joined client holding an UPLOAD_GRANT (METRICS and one UPDATE
    permitted), so the payload decoders behind it are reached; a client takes AGGREGATEs from its server."""
    if client_side:
        quic = QuicConnection(configuration=CLIENT_CONFIG)
    else:
        quic = QuicConnection(configuration=cfg, original_destination_connection_id=bytes(8))
    core = FedQuicConnection(quic, limits=LIMITS)
    core.established = True
    if client_side:
        core.open_control()
    else:
        core.permit(MsgType.METRICS, BulkPermit(max_body=0))
        core.permit(MsgType.UPDATE, BulkPermit(max_body=LIMITS.max_body_bytes, count=1))
    out: list[object] = []
    # delivered in a few chunks, as QUIC would
    cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
    pos = 0
    for c in [*cuts, len(data)]:
        out += core.handle_event(
            StreamDataReceived(data=data[pos:c], end_stream=end and c == len(data), stream_id=stream_id), 0.0
        )
        pos = c
    kinds = []
    for ev in out:
        if isinstance(ev, MessageReceived):
            h = ev.message.header
            if isinstance(h, (Update, Aggregate)):
                try:
                    manifest = expand(h.manifest, SCHEMA, LIMITS)
                    SCHEMA.check_manifest(manifest)
                    decoded = decode_tensors(manifest, ev.message.body, LIMITS)
                    assert all(np.isfinite(v).all() for v in decoded.values())
                    kinds.append("decoded")
                except FedQuicError:
                    kinds.append("refused-payload")
            else:
                kinds.append("message")
        elif isinstance(ev, ProtocolViolation):
            assert isinstance(ev.error, FedQuicError)
            kinds.append("violation")
    return ",".join(kinds) or "nothing"


def home_stream(seed: bytes, rng: random.Random) -> tuple[bool, int]:
    """Where a seed frame belongs: (to a client?, stream id). The transport refuses a bulk message on the
    control stream and a control message on a unidirectional one, so valid frames go to their own kind of
    stream: AGGREGATE to a client on a server-initiated unidirectional stream, UPDATE and METRICS to a server on
    a client-initiated one, everything else on the control stream."""
    mtype = MsgType(seed[3])  # the type byte of the 16-byte prefix
    if mtype is MsgType.AGGREGATE:
        return True, rng.choice([3, 7])
    if mtype in (MsgType.UPDATE, MsgType.METRICS):
        return False, rng.choice([2, 6])
    return False, 0


def fuzz(cfg: QuicConfiguration, n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    pool = seeds()
    outcomes: dict[str, int] = {}
    slowest = 0.0
    tracemalloc.start()
    try:
        for _ in range(n):
            data = rng.choice(pool)
            client_side, sid = home_stream(data, rng)
            if rng.random() < 0.25:  # now and then on a stream of the wrong kind (refused at the prefix)
                sid = rng.choice([0, 3, 7] if client_side else [0, 2, 6])
            for _ in range(rng.choice([1, 1, 2, 3])):
                data = mutate(rng, data, pool)
            t0 = time.perf_counter()
            kind = run_one(cfg, data, sid, rng.random() < 0.7, rng, client_side=client_side)
            slowest = max(slowest, time.perf_counter() - t0)
            outcomes[kind] = outcomes.get(kind, 0) + 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert slowest < 2.0, f"an input took {slowest:.2f} s"
    assert peak < 256 << 20, f"peak traced memory {peak >> 20} MiB"  # bounded by the limits, not the claims
    return outcomes


def test_fuzz_receive_path_5k(server_config: QuicConfiguration) -> None:
    outcomes = fuzz(server_config, 5_000, seed=1)
    # the corpus really exercises both sides: valid messages, decoded payloads and refusals
    assert outcomes.get("violation", 0) > 500 and sum(v for k, v in outcomes.items() if "message" in k) > 100
    assert sum(v for k, v in outcomes.items() if "decoded" in k or "refused-payload" in k) > 100


@pytest.mark.slow
def test_fuzz_receive_path_100k(server_config: QuicConfiguration) -> None:
    outcomes = fuzz(server_config, 100_000, seed=2)
    assert sum(outcomes.values()) == 100_000


async def test_live_server_keeps_serving_while_fuzzed(dev_pki, loopback_server, light_client) -> None:
    from fedquic.common.messages import TrainSpec
    from fedquic.server.config import JobConfig
    from fedquic.server.rounds import RoundPolicy
    from fedquic.transport.aio import connect_peer
    from fedquic.transport.backend import get_backend
    from fedquic.transport.pki import issue_client_cert
    from fedquic.transport.settings import TlsFiles, TransportSettings

    from testkit.synthetic import SyntheticLearner

    server = loopback_server(
        transport=TransportSettings(limits=LIMITS),
        policy=RoundPolicy(rounds=2, min_clients=2, round_timeout_s=60),
        job=JobConfig(train=TrainSpec(local_steps=1)),
    )
    port = await server.start()
    good = [light_client(f"fz-good-{i}", port, SyntheticLearner(SCHEMA, seed=i, train_seconds=4.0)) for i in range(2)]
    cert, key = issue_client_cert(dev_pki, "fz-bad")
    bad_tls = TlsFiles(ca=dev_pki.ca_cert, cert=cert, key=key)
    rng = random.Random(11)
    pool = seeds()
    quic_closed = get_backend().ConnectionError

    async def attacker(n: int) -> int:
        sent = 0
        for _ in range(n):
            data = mutate(rng, mutate(rng, rng.choice(pool), pool), pool)
            try:
                async with connect_peer(
                    "127.0.0.1", port, TransportSettings(connect_timeout_s=5), bad_tls, "localhost"
                ) as p:
                    p._quic.send_stream_data(p.core.control_stream_id, data, end_stream=rng.random() < 0.5)
                    p.transmit()
                    sent += 1
                    with contextlib.suppress(Exception):
                        await p.recv(timeout=0.2)
            except (FedQuicError, quic_closed):
                # the server closed this connection (a newer one of the same identity replaced it, or it
                # refused the frames): qh3 raises on a send after that, aioquic drops it quietly
                pass
        return sent

    attackers = [attacker(12) for _ in range(4)]  # concurrent, while the good clients train their rounds
    result, _, _, *sent = await asyncio.wait_for(
        asyncio.gather(server.run(), *(c.run() for c in good), *attackers), timeout=180
    )
    assert result.ok and result.rounds_completed == 2
    assert sum(sent) >= 20
    assert sum(server.metrics.rejected.values()) > 0  # the fuzzed frames were refused, with codes
    for c in good:
        assert server.records[c.cfg.client_id].view_hash == c.view_hash
