"""What one client with a valid certificate can do to the server: each attack runs over real loopback QUIC against a
real ``fedquic server`` process while a good job (two light client processes) runs beside it. The server's memory
is read from /proc while the attack runs; the job must complete, and the attacker's connection must be closed
with the error the protocol promises.

The figures in docs/reliability.md ("Attacks by a client with a valid certificate") come from these tests
(``-s`` prints each attack's peak RSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fedquic.common.adapter import init_lora_state
from fedquic.common.codec import Manifest, encode_payload
from fedquic.common.errors import ErrorCode
from fedquic.common.messages import (
    SUPPORTED_VERSIONS,
    Aggregate,
    Error,
    Hello,
    Join,
    RoundStart,
    Update,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from fedquic.transport.aio import Peer, connect_peer
from fedquic.transport.framing import PREFIX, encode_frame, encode_frame_head
from fedquic.transport.pki import DevPki, issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

from testkit.synthetic import SyntheticLearner, lora_schema

pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("quic_backend")]  # each test once per QUIC backend

SCHEMA = lora_schema(layers=2, dim=64, rank=4)  # what `python -m testkit.synthetic` builds by default
FINGERPRINT = SyntheticLearner(SCHEMA).base_fingerprint()
HELLO_TIMEOUT_S = 3.0
RSS_BOUND_MB = 64.0  # the landed code grew by 1.1 GB (one claim), 3.2 GB (three) and 98 MB (unread uploads)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class RssWatch:
    """Samples a process's resident memory every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = self.base = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.base


@dataclass
class Job:
    server: subprocess.Popen[bytes]
    clients: list[subprocess.Popen[bytes]]
    port: int
    pki: DevPki
    run_dir: Path
    log: Path

    def history(self) -> list[dict[str, object]]:
        path = self.run_dir / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def finish(self, timeout: float = 90.0) -> None:
        """The good job completes: the server and both clients exit 0."""
        deadline = time.monotonic() + timeout
        for p in [self.server, *self.clients]:
            p.wait(timeout=max(deadline - time.monotonic(), 1.0))
        assert self.server.returncode == 0, self.log.read_text()[-3000:]
        assert [c.returncode for c in self.clients] == [0, 0], self.log.read_text()[-3000:]


def _server_config(pki: DevPki, tmp: Path, rounds: int, extra: str) -> Path:
    cfg = tmp / "server.toml"
    cfg.write_text(
        f"""host = "127.0.0.1"
port = 0
run_dir = "{tmp / "server"}"
ready_file = "{tmp / "server.ready"}"
[tls]
ca = "{pki.ca_cert}"
cert = "{pki.server_cert}"
key = "{pki.server_key}"
[transport]
hello_timeout_s = {HELLO_TIMEOUT_S}
{extra}
[transport.limits]
control_frame_timeout_s = {HELLO_TIMEOUT_S}
[policy]
rounds = {rounds}
min_clients = 2
round_timeout_s = 8.0
registration_timeout_s = 60.0
[job]
uplink = "fp32"
downlink = "int8"
[metrics]
enabled = false
"""
    )
    return cfg


@contextlib.contextmanager
def good_job(dev_pki: DevPki, tmp: Path, *, rounds: int = 5, extra: str = "", train_s: float = 1.5) -> Iterator[Job]:
    """A ``fedquic server`` process and two light client processes; yields once round 1 has started."""
    log = tmp / "job.log"
    out = log.open("ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cfg = _server_config(dev_pki, tmp, rounds, extra)
    server = subprocess.Popen(
        [sys.executable, "-m", "fedquic.cli", "server", "--config", str(cfg)], stdout=out, stderr=out, env=env
    )
    ready = tmp / "server.ready"
    for _ in range(300):
        if ready.exists():
            break
        assert server.poll() is None, log.read_text()
        time.sleep(0.05)
    port = json.loads(ready.read_text())["port"]
    clients = []
    for cid in ("good-1", "good-2"):
        issue_client_cert(dev_pki, cid)
        cmd = [sys.executable, "-m", "testkit.synthetic", "--client-id", cid, "--server", f"127.0.0.1:{port}"]
        cmd += ["--certs", str(dev_pki.root), "--run-dir", str(tmp / cid), "--train-seconds", str(train_s)]
        clients.append(subprocess.Popen(cmd, stdout=out, stderr=out, env=env))
    job = Job(server, clients, port, dev_pki, tmp / "server", log)
    try:
        for _ in range(400):  # round 1 started: both good clients joined
            if "round 1 started" in log.read_text():
                break
            time.sleep(0.05)
        yield job
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait()
        out.close()


@contextlib.asynccontextmanager
async def attacker(job: Job, cid: str = "mallory") -> AsyncIterator[Peer]:
    cert, key = issue_client_cert(job.pki, cid)
    tls = TlsFiles(ca=job.pki.ca_cert, cert=cert, key=key)
    async with connect_peer("127.0.0.1", job.port, TransportSettings(connect_timeout_s=5), tls, "localhost") as p:
        yield p


def hello(cid: str = "mallory") -> Hello:
    return Hello(versions=SUPPORTED_VERSIONS, client_id=cid, base_fingerprint=FINGERPRINT, num_samples=1)


async def join(peer: Peer, cid: str = "mallory") -> None:
    peer.send(hello(cid))
    assert isinstance((await peer.recv(timeout=10)).header, Welcome)
    peer.send(Join(adapter=SCHEMA))
    await peer.recv(timeout=10)  # ACK(JOIN)


def raw(peer: Peer, data: bytes, *, bulk: bool) -> None:
    """Bytes straight onto a new unidirectional stream, or the control stream: what a hand-written attacker does."""
    sid = peer._quic.get_next_available_stream_id(is_unidirectional=True) if bulk else peer.core.open_control()
    peer._quic.send_stream_data(sid, data, end_stream=False)
    peer.transmit()


def claim(body_len: int) -> bytes:
    """An UPDATE frame's prefix and header claiming ``body_len`` body bytes (none of which follow)."""
    h = Update(round=1, client_id="mallory", num_samples=1, base_hash="ab", manifest=Manifest(tensors=(), raw_size=0))
    return encode_frame_head(h, body_len)


async def closed_with(peer: Peer, timeout: float) -> int:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(peer.closed.wait(), timeout)
    assert peer.closed.is_set(), "the server left the attacker's connection open"
    return peer.close_code - 0x100


# -- 1. allocation before receipt --------------------------------------------------------------------------------


async def test_claimed_gigabytes_allocate_nothing(dev_pki, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with good_job(dev_pki, tmp_path) as job, RssWatch(job.server.pid) as rss:
        # 17 bytes claiming 1 GiB, before HELLO: a bulk stream nobody allowed
        async with attacker(job, "m-1") as a:
            raw(a, claim(1 << 30)[:17], bulk=True)
            assert await closed_with(a, 5) == ErrorCode.UNEXPECTED_MESSAGE
        # three streams claiming 1 GiB each after JOIN, without a grant, each with its whole header (the landed
        # code allocated the claimed bodies once the header was in: +3.1 GB)
        async with attacker(job, "m-2") as a:
            await join(a, "m-2")
            for _ in range(3):
                raw(a, claim(1 << 30), bulk=True)
            assert await closed_with(a, 5) == ErrorCode.UNEXPECTED_MESSAGE
        # with a grant for 1 KB, a claim of 1 GiB: over the grant, refused at the prefix
        async with attacker(job, "m-3") as a:
            await join(a, "m-3")
            rs = await next_header(a, RoundStart, 15)
            a.send(UploadRequest(round=rs.round, nbytes=1000))
            await next_header(a, UploadGrant, 15)
            raw(a, claim(1 << 30), bulk=True)
            assert await closed_with(a, 5) == ErrorCode.LIMIT_EXCEEDED
        # a body on a message that has none, and a control header over its limit: refused before buffering
        async with attacker(job, "m-4") as a:
            raw(a, PREFIX.pack(b"FQ", 1, 9, 10, 1 << 30), bulk=False)
            assert await closed_with(a, 5) == ErrorCode.MALFORMED_FRAME
        async with attacker(job, "m-5") as a:
            raw(a, PREFIX.pack(b"FQ", 1, 1, 1 << 20, 0), bulk=False)
            assert await closed_with(a, 5) == ErrorCode.LIMIT_EXCEEDED
        job.finish()
    print(f"\nallocation attacks: server RSS {rss.base:.0f} -> peak {rss.peak:.0f} MB")
    assert rss.growth < RSS_BOUND_MB


async def next_header(peer: Peer, kind: type, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        h = (await peer.recv(timeout=max(deadline - time.monotonic(), 0.01))).header
        if isinstance(h, kind):
            return h
        assert not isinstance(h, Error), h


# -- 2. connections that never register ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["silent", "partial-hello", "drip"])
async def test_a_connection_that_never_registers_is_closed_at_the_deadline(dev_pki, tmp_path: Path, how: str) -> None:
    with good_job(dev_pki, tmp_path) as job, RssWatch(job.server.pid) as rss:
        async with attacker(job) as a:
            t0 = time.monotonic()
            frame = encode_frame(hello())
            if how == "partial-hello":
                raw(a, frame[: len(frame) // 2], bulk=False)
            elif how == "drip":
                sid = a.core.open_control()
                for i in range(len(frame) - 1):  # one byte every 0.5 s: never a whole frame in time
                    if a.closed.is_set():
                        break
                    a._quic.send_stream_data(sid, frame[i : i + 1])
                    a.transmit()
                    await asyncio.sleep(0.5)
            code = await closed_with(a, HELLO_TIMEOUT_S + 5)
            assert code == ErrorCode.TIMEOUT
            assert time.monotonic() - t0 < HELLO_TIMEOUT_S + 4  # at the deadline, not when QUIC's idle timer fires
        job.finish()
    assert rss.growth < RSS_BOUND_MB


# -- 3. idle connections -----------------------------------------------------------------------------------------


async def test_idle_connections_are_bounded_in_total_and_per_identity(dev_pki, tmp_path: Path) -> None:
    # 2 good clients + 18 more: the server holds at most 20 connections (the good clients connected first)
    with good_job(dev_pki, tmp_path, extra="max_connections = 20\nmax_connections_per_identity = 2") as job:
        with RssWatch(job.server.pid) as rss:
            async with contextlib.AsyncExitStack() as stack:
                same = [await stack.enter_async_context(attacker(job, "twin")) for _ in range(4)]
                await asyncio.sleep(0.5)
                # the newest two of one identity stay; the older ones were replaced
                assert [p.closed.is_set() for p in same] == [True, True, False, False]
                assert {p.close_code - 0x100 for p in same[:2]} == {ErrorCode.IDENTITY_MISMATCH}
                others = [await stack.enter_async_context(attacker(job, f"idle-{i}")) for i in range(20)]
                await asyncio.sleep(0.5)
                refused = [p for p in others if p.closed.is_set()]
                assert len(refused) == 4  # 2 good + 2 twins + 16 = 20
                assert {p.close_code - 0x100 for p in refused} == {ErrorCode.LIMIT_EXCEEDED}
                # none of them sends HELLO: every one is closed with TIMEOUT at the HELLO deadline
                live = [p for p in [*same, *others] if not p.closed.is_set()]
                codes = await asyncio.gather(*(closed_with(p, HELLO_TIMEOUT_S + 5) for p in live))
                assert set(codes) == {ErrorCode.TIMEOUT}
        job.finish()
    assert rss.growth < RSS_BOUND_MB


# -- 4. unread uploads -------------------------------------------------------------------------------------------


async def test_uploads_without_a_grant_are_refused_at_their_first_bytes(dev_pki, tmp_path: Path) -> None:
    body = bytes(16 << 20)
    manifest = Manifest(tensors=(), raw_size=len(body))
    update = Update(round=1, client_id="mallory", num_samples=1, base_hash="ab", manifest=manifest)
    with good_job(dev_pki, tmp_path) as job, RssWatch(job.server.pid) as rss:
        for when in ("before-hello", "after-join"):
            async with attacker(job) as a:
                if when == "after-join":
                    await join(a)
                for _ in range(6):  # 6 x 16 MiB, complete frames
                    if a.closed.is_set():
                        break
                    raw(a, encode_frame(update, body), bulk=True)
                    await asyncio.sleep(0.05)
                assert await closed_with(a, 10) == ErrorCode.UNEXPECTED_MESSAGE
        await asyncio.sleep(1.0)
        after = rss_mb(job.server.pid)
        job.finish()
    assert rss.growth < RSS_BOUND_MB
    assert after - rss.base < RSS_BOUND_MB  # nothing of the attack is still held


# -- 5. a lazy client --------------------------------------------------------------------------------------------


async def test_a_lazy_client_neither_fails_the_job_nor_free_rides(dev_pki, tmp_path: Path) -> None:
    with good_job(dev_pki, tmp_path, rounds=4, train_s=0.5) as job:
        async with attacker(job, "lazy") as lazy:
            await join(lazy, "lazy")  # joins during round 1: sampled from round 2 on, then never trains
            got: list[Aggregate] = []

            async def listen() -> None:
                with contextlib.suppress(Exception):
                    while True:
                        h = (await lazy.recv()).header
                        if isinstance(h, Aggregate):
                            got.append(h)

            listener = asyncio.ensure_future(listen())
            await asyncio.to_thread(job.finish, 120.0)
            listener.cancel()
        hist = job.history()
        assert [r["round"] for r in hist] == [1, 2, 3, 4]
        assert all("lazy" not in r["contributors"] for r in hist)
        assert all(set(r["contributors"]) == {"good-1", "good-2"} for r in hist)
        # it was sent the aggregate of round 1 (it had just joined, not yet missed anything), then nothing
        assert {a.round for a in got if a.kind == "row"} <= {1}


def test_update_claims_are_bounded_by_the_jobs_schema() -> None:
    """An UPLOAD_REQUEST larger than the job's adapter could take in its uplink encoding is refused."""
    from fedquic.common.codec import EncodingSpec, max_body_nbytes

    state = init_lora_state(SCHEMA, 0)
    for enc in ("fp32", "int8", "topk10", "topk1-fp32"):
        spec = EncodingSpec.parse(enc)
        bound = max_body_nbytes([t.shape for t in SCHEMA.tensors], spec)
        assert len(encode_payload(state, spec).body) <= bound < 2 * 4 * SCHEMA.numel
