"""Transport benchmark: acknowledged QUIC throughput, handshake time and control latency under load, against an
asyncio TLS 1.3 / TCP baseline measured in the same run.

What it measures
----------------
Two processes on loopback: the servers run in a child process (``--serve``, started and stopped by this script;
its stdin closing tells it to exit), the client in this one. Both use the same event loop (``--loop``).

1. **Acked QUIC throughput.** On a connection of its own per datagram size (1350, the default and the size that
   must work on real networks; 1452; 16000, the loopback maximum), after a 1 MiB warm-up, the client sends a
   16 MiB and a 64 MiB random body as one AGGREGATE with ``await peer.send_bulk(...)``. The clock runs from the
   call until the server's application ACK arrives carrying the SHA-256 of the body it received, which is
   checked. MB/s = body bytes / seconds, 1 MB = 1e6 bytes. The server hashes the whole body after receiving it,
   inside the timed interval (the same for the baseline).
2. **TLS/TCP baseline.** ``asyncio.start_server`` with TLS 1.3 from the same dev PKI, client certificate
   required, no session tickets; the same bodies as one length-prefixed message (4-byte id, 8-byte length),
   written in 256 KiB chunks with ``drain()``, answered with the id and the SHA-256. ``quic_vs_tls_tcp`` =
   QUIC MB/s at the default datagram size / TLS MB/s, both for 64 MiB.
3. **Handshake.** Median of N fresh ``connect_peer`` calls until the peer is ready (QUIC + TLS 1.3 with mutual
   TLS, plus a Retry round trip when ``TransportSettings.retry`` is on), beside the median TLS/TCP connect
   (TCP + TLS 1.3 with a client certificate), and the median resumed handshake: the same connect with a
   :class:`TicketJar` holding the server's last single-use ticket (PSK, no certificates exchanged).
4. **Control latency.** On a fresh connection at the default datagram size, a HEARTBEAT every 20 ms on the
   control stream; the server answers each with an ACK at once; the round trip (send to ACK received) gives
   p50 / p99. First with nothing else flowing (idle), then while a 64 MiB ``send_bulk`` runs as a task, until
   its ACK arrives. Samples of all repetitions are pooled.

Each transfer also records the CPU seconds both processes spent on it (client: ``time.process_time``; server:
``/proc/PID/stat``): near 100% of a core on either side means that side is CPU-bound. The UDP socket buffers
the kernel granted (``Peer.socket_buffers``, both sides) are reported.

Targets checked (reported, never forced): ``quic_mbps_1452`` >= 20, ``control_p99_ms`` <= 50, and
``resumed_handshake_ms`` < ``handshake_ms``.

Run
---
::

    .venv/bin/python bench/transport.py --json          # table, then one JSON object as the last stdout line
    .venv/bin/python bench/transport.py --quick --json  # 4 MiB payloads, 5 handshakes, 1 rep: smoke test
    .venv/bin/python bench/transport.py --loop uvloop   # both processes on uvloop
    .venv/bin/python bench/transport.py --backend aioquic --json   # both processes on aioquic (default: auto)
    .venv/bin/python bench/transport.py --sections quic --datagram-sizes 1452 --reps 1 --profile /tmp/prof

Options: ``--backend auto|aioquic|qh3`` (the QUIC implementation of both processes, through
``$FEDQUIC_QUIC_BACKEND``; ``config.quic_backend`` says which ran), ``--reps N`` (transfers and control phases
per configuration; medians are reported, default 5), ``--handshakes N``, ``--datagram-sizes A,B,C``,
``--sections quic,tls,handshake,control``, ``--profile DIR`` (cProfile both processes; prints their top
functions; timings under the profiler are slower).
Loopback on a shared 2-core machine is noisy: compare against the same-run TLS/TCP baseline, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import io
import json
import logging
import math
import os
import platform
import pstats
import select
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedquic.common.codec import Manifest
from fedquic.common.errors import TransportError
from fedquic.common.messages import Ack, Aggregate, Heartbeat, MsgType
from fedquic.transport.aio import FedQuicServer, Peer, connect_peer
from fedquic.transport.backend import ENV_VAR, get_backend
from fedquic.transport.connection import BulkPermit
from fedquic.transport.pki import DevPki, init_dev_pki, issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings
from fedquic.transport.tickets import TicketJar

MB = 1_000_000
MiB = 1 << 20
DEFAULT_DGRAM = 1350
DGRAM_1452 = 1452
DGRAM_MAX = 16_000
HOST = "127.0.0.1"
SERVER_NAME = "localhost"
WARMUP_BYTES = 1 * MiB
TLS_CHUNK = 256 * 1024
TLS_PREFIX = struct.Struct(">IQ")  # transfer id, body length
TLS_ACK = struct.Struct(">I64s")  # transfer id, SHA-256 hex
HEARTBEAT_PERIOD_S = 0.020
SECTIONS = ("quic", "tls", "handshake", "control")
TARGETS = {
    "quic_mbps_1452": (">=", 20.0),
    "control_p99_ms": ("<=", 50.0),
}

T = TypeVar("T")
log = logging.getLogger("bench.transport")


# -- helpers --------------------------------------------------------------------------------------------------


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no samples."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def sha256_hex(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_s() -> float:
    """CPU seconds all processes of this machine spent busy (Linux /proc/stat, all CPUs; 0 elsewhere)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_loop(coro: Coroutine[Any, Any, T], loop_kind: str) -> T:
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return f"{type(loop).__module__}.{type(loop).__name__}"


def tls_contexts(pki: DevPki, client_cert: Path, client_key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS 1.3 contexts from the dev PKI; the server requires a client certificate."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server.load_verify_locations(cafile=str(pki.ca_cert))
    server.verify_mode = ssl.CERT_REQUIRED
    server.num_tickets = 0  # like the QUIC server: no session tickets, every handshake is a full one
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_verify_locations(cafile=str(pki.ca_cert))
    client.load_cert_chain(str(client_cert), str(client_key))
    return server, client


def aggregate(tid: int, size: int) -> Aggregate:
    return Aggregate(round=tid, contributors=0, manifest=Manifest(tensors=(), raw_size=size))


def quic_cipher(peer: Peer) -> str | None:
    """Negotiated TLS cipher suite of a QUIC connection (either backend's TLS context, best effort)."""
    try:
        return str(peer._quic.tls.key_schedule.cipher_suite.name)
    except AttributeError:
        return None


# -- server process -------------------------------------------------------------------------------------------


async def serve_main(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: QUIC echo servers (one per datagram size) and the TLS/TCP echo server, until stdin closes."""
    pki = DevPki(Path(args.pki))
    tls = TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key)
    sizes = [int(s) for s in args.datagram_sizes.split(",")]
    stats: dict[str, Any] = {"loop": loop_name(), "socket_buffers": {}, "quic_connections": 0, "tls_connections": 0}

    pending: set[asyncio.Task[None]] = set()

    async def ack_bulk(peer: Peer, tid: int, body: bytes) -> None:
        # hashlib releases the GIL: hashing in a thread keeps the loop answering heartbeats meanwhile
        digest = await asyncio.to_thread(sha256_hex, body)
        with contextlib.suppress(TransportError):
            peer.send(Ack(ref=MsgType.AGGREGATE, round=tid, state_hash=digest))

    def quic_handler(dgram: int) -> Callable[[Peer], Awaitable[None]]:
        async def handler(peer: Peer) -> None:
            stats["quic_connections"] += 1
            stats["socket_buffers"][str(dgram)] = list(peer.socket_buffers)
            while True:
                try:
                    msg = await peer.recv()
                except TransportError:
                    return
                if msg.type is MsgType.HEARTBEAT:
                    assert isinstance(msg.header, Heartbeat)
                    peer.send(Ack(ref=MsgType.HEARTBEAT, round=msg.header.seq))
                elif msg.type is MsgType.AGGREGATE:
                    assert isinstance(msg.header, Aggregate)
                    task = asyncio.ensure_future(ack_bulk(peer, msg.header.round, msg.body))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

        return handler

    async def tls_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["tls_connections"] += 1
        try:
            while True:
                tid, n = TLS_PREFIX.unpack(await reader.readexactly(TLS_PREFIX.size))
                body = bytearray()
                while len(body) < n:
                    chunk = await reader.read(min(n - len(body), 1 << 20))
                    if not chunk:
                        raise asyncio.IncompleteReadError(bytes(body), n)
                    body += chunk
                digest = await asyncio.to_thread(sha256_hex, body)
                writer.write(TLS_ACK.pack(tid, digest.encode()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    servers: list[FedQuicServer] = []
    ports: dict[str, int] = {}
    for d in sizes:
        srv = FedQuicServer(
            TransportSettings(max_datagram_size=d),
            tls,
            quic_handler(d),
            # an echo harness, not a job: every connection may send bulk transfers from the start
            bulk_permits=lambda: {MsgType.AGGREGATE: BulkPermit(max_body=1 << 30)},
        )
        ports[str(d)] = await srv.start(HOST, 0)
        servers.append(srv)
    server_ctx, _ = tls_contexts(pki, pki.server_cert, pki.server_key)
    tcp = await asyncio.start_server(tls_handler, HOST, 0, ssl=server_ctx)
    tls_port = tcp.sockets[0].getsockname()[1]

    lags: list[float] = []

    async def watch_loop(period: float = 0.005) -> None:
        """How late a 5 ms timer fires: how long the loop was busy with something else (a stall)."""
        while True:
            t = time.perf_counter()
            await asyncio.sleep(period)
            lags.append((time.perf_counter() - t - period) * 1e3)

    watcher = asyncio.ensure_future(watch_loop())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def wait_stdin() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe or died
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_stdin, daemon=True).start()
    print("READY " + json.dumps({"quic_ports": ports, "tls_port": tls_port, "pid": os.getpid()}), flush=True)
    await stop.wait()
    watcher.cancel()
    stats["loop_lag_p99_ms"] = percentile(lags, 99)
    stats["loop_lag_max_ms"] = max(lags, default=None)
    tcp.close()
    for srv in servers:
        await srv.close()
    return stats


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="server %(levelname)s %(name)s: %(message)s")
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        prof.enable()
    try:
        stats = run_loop(serve_main(args), args.loop)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(Path(args.profile) / "server.pstats"))
    print("STATS " + json.dumps(stats), flush=True)
    return 0


class ServerProcess:
    """The child server process: started with its ports read back, always stopped (killed if it hangs)."""

    def __init__(self, pki: DevPki, loop_kind: str, sizes: Sequence[int], profile: Path | None) -> None:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            "--pki",
            str(pki.root),
            "--loop",
            loop_kind,
            "--datagram-sizes",
            ",".join(str(s) for s in sizes),
        ]
        if profile is not None:
            cmd += ["--profile", str(profile)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.stats: dict[str, Any] = {}
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], 30)
            line = self.proc.stdout.readline() if ready and self.proc.stdout else ""
            if not line.startswith("READY "):
                raise RuntimeError(f"server process did not start (rc={self.proc.poll()}, said {line!r})")
            info = json.loads(line[len("READY ") :])
        except BaseException:
            self.stop()
            raise
        self.quic_ports: dict[int, int] = {int(k): v for k, v in info["quic_ports"].items()}
        self.tls_port: int = info["tls_port"]
        self.pid: int = self.proc.pid

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            out, _ = self.proc.communicate(input="", timeout=timeout)
            for line in out.splitlines():
                if line.startswith("STATS "):
                    self.stats = json.loads(line[len("STATS ") :])
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            log.warning("server process did not exit within %.0f s: killed", timeout)


# -- client measurements --------------------------------------------------------------------------------------


@dataclass
class Transfer:
    kind: str  # "quic" or "tls"
    dgram: int | None
    size: int
    seconds: float
    client_cpu_s: float
    server_cpu_s: float
    rep: int = 0
    other_cpu_s: float = 0.0  # CPU that other processes on this machine used meanwhile

    @property
    def mbps(self) -> float:
        return self.size / self.seconds / MB


@dataclass
class Bodies:
    large: bytes
    small: bytes | None
    warmup: bytes
    digests: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for b in (self.large, self.small, self.warmup):
            if b is not None:
                self.digests[len(b)] = hashlib.sha256(b).hexdigest()

    def timed(self) -> list[bytes]:
        return [b for b in (self.small, self.large) if b is not None]


class Client:
    def __init__(self, args: argparse.Namespace, server: ServerProcess, pki: DevPki, bodies: Bodies) -> None:
        self.args = args
        self.server = server
        self.bodies = bodies
        cert, key = issue_client_cert(pki, "bench-client")
        self.tls = TlsFiles(ca=pki.ca_cert, cert=cert, key=key)
        _, self.client_ctx = tls_contexts(pki, cert, key)
        self.next_id = 0
        self.rep = 0
        self.transfers: list[Transfer] = []
        self.socket_buffers: dict[str, list[int]] = {}
        self.info: dict[str, Any] = {}

    def tid(self) -> int:
        self.next_id += 1
        return self.next_id

    def settings(self, dgram: int) -> TransportSettings:
        return TransportSettings(max_datagram_size=dgram)

    async def _measure(self, coro: Awaitable[None], kind: str, dgram: int | None, size: int) -> Transfer:
        c0, s0, b0 = time.process_time(), self.server.cpu_s(), system_busy_s()
        t0 = time.perf_counter()
        await asyncio.wait_for(coro, self.args.transfer_timeout)
        dt = time.perf_counter() - t0
        cc, sc = time.process_time() - c0, self.server.cpu_s() - s0
        other = max(0.0, system_busy_s() - b0 - cc - sc)
        return Transfer(kind, dgram, size, dt, cc, sc, self.rep, other)

    # QUIC ------------------------------------------------------------------------------------------------

    async def open_control(self, peer: Peer) -> None:
        """The control stream exists once the client sends on it (HELLO, in the real protocol)."""
        peer.send(Heartbeat(seq=0))
        msg = await peer.recv(timeout=10)
        if not (isinstance(msg.header, Ack) and msg.header.ref is MsgType.HEARTBEAT):
            raise RuntimeError(f"expected a heartbeat ACK, got {msg.header!r}")

    async def quic_send(self, peer: Peer, body: bytes) -> None:
        tid = self.tid()
        await peer.send_bulk(aggregate(tid, len(body)), body)
        msg = await peer.recv()
        h = msg.header
        if not (isinstance(h, Ack) and h.ref is MsgType.AGGREGATE and h.round == tid):
            raise RuntimeError(f"expected the ACK of transfer {tid}, got {h!r}")
        if h.state_hash != self.bodies.digests[len(body)]:
            raise RuntimeError(f"transfer {tid}: body hash mismatch ({h.state_hash} != expected)")

    async def quic_throughput(self, dgram: int) -> None:
        port = self.server.quic_ports[dgram]
        async with connect_peer(HOST, port, self.settings(dgram), self.tls, SERVER_NAME) as peer:
            self.socket_buffers[str(dgram)] = list(peer.socket_buffers)
            self.info.setdefault("quic_cipher", quic_cipher(peer))
            await self.open_control(peer)
            await self.quic_send(peer, self.bodies.warmup)
            for body in self.bodies.timed():
                t = await self._measure(self.quic_send(peer, body), "quic", dgram, len(body))
                self.transfers.append(t)
                print(f"  quic  dgram {dgram:>5}  {len(body) / MiB:>4.0f} MiB  {t.mbps:8.1f} MB/s", flush=True)

    # TLS / TCP -------------------------------------------------------------------------------------------

    async def tls_send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> None:
        tid = self.tid()
        writer.write(TLS_PREFIX.pack(tid, len(body)))
        view = memoryview(body)
        for off in range(0, len(body), TLS_CHUNK):
            writer.write(view[off : off + TLS_CHUNK])
            await writer.drain()
        got_id, digest = TLS_ACK.unpack(await reader.readexactly(TLS_ACK.size))
        if got_id != tid or digest.decode() != self.bodies.digests[len(body)]:
            raise RuntimeError(f"TLS transfer {tid}: bad ACK (id {got_id}, hash {digest!r})")

    async def tls_open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            HOST, self.server.tls_port, ssl=self.client_ctx, server_hostname=SERVER_NAME
        )

    async def tls_throughput(self) -> None:
        reader, writer = await self.tls_open()
        try:
            sslobj = writer.get_extra_info("ssl_object")
            if sslobj is not None:
                self.info.setdefault("tls_cipher", sslobj.cipher()[0])
                self.info.setdefault("tls_version", sslobj.version())
            await self.tls_send(reader, writer, self.bodies.warmup)
            for body in self.bodies.timed():
                t = await self._measure(self.tls_send(reader, writer, body), "tls", None, len(body))
                self.transfers.append(t)
                print(f"  tls   tcp          {len(body) / MiB:>4.0f} MiB  {t.mbps:8.1f} MB/s", flush=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # handshakes ------------------------------------------------------------------------------------------

    async def handshakes(self, n: int) -> dict[str, list[float]]:
        port = self.server.quic_ports[DEFAULT_DGRAM]
        quic_ms: list[float] = []
        tls_ms: list[float] = []
        resumed_ms: list[float] = []
        resumed = 0
        jar = TicketJar()

        async def resume_once() -> tuple[float, bool]:
            t0 = time.perf_counter()
            async with connect_peer(
                HOST, port, self.settings(DEFAULT_DGRAM), self.tls, SERVER_NAME, tickets=jar
            ) as peer:
                dt = (time.perf_counter() - t0) * 1e3
                for _ in range(200):  # keep the connection until the server's next ticket has arrived
                    if len(jar):
                        break
                    await asyncio.sleep(0.005)
                return dt, peer.session_resumed

        await resume_once()  # seeds the jar with a first ticket
        for _ in range(n):
            t0 = time.perf_counter()
            async with connect_peer(HOST, port, self.settings(DEFAULT_DGRAM), self.tls, SERVER_NAME):
                quic_ms.append((time.perf_counter() - t0) * 1e3)
            dt, was_resumed = await resume_once()
            if was_resumed:
                resumed_ms.append(dt)
                resumed += 1
            t0 = time.perf_counter()
            _, writer = await self.tls_open()
            tls_ms.append((time.perf_counter() - t0) * 1e3)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self.info["quic_sessions_resumed"] = resumed
        print(
            f"  handshakes: quic median {median(quic_ms):.1f} ms, resumed {median(resumed_ms):.1f} ms "
            f"({resumed}/{n} resumed), tls/tcp median {median(tls_ms):.1f} ms (n={n})",
            flush=True,
        )
        return {"quic": quic_ms, "tls": tls_ms, "resumed": resumed_ms}

    # control latency -------------------------------------------------------------------------------------

    async def control(self, idle_s: float) -> dict[str, Any]:
        """Heartbeat round trips on an idle connection, then while a large bulk transfer runs."""
        body = self.bodies.large
        settings = self.settings(DEFAULT_DGRAM)
        async with connect_peer(HOST, self.server.quic_ports[DEFAULT_DGRAM], settings, self.tls, SERVER_NAME) as peer:
            await self.open_control(peer)
            sent: dict[int, float] = {}
            rtts: dict[int, float] = {}
            bulk_acked = asyncio.get_running_loop().create_future()
            bulk_tid = -1

            async def reader() -> None:
                while True:
                    msg = await peer.recv()
                    h = msg.header
                    now = time.perf_counter()
                    if isinstance(h, Ack) and h.ref is MsgType.HEARTBEAT and h.round in sent:
                        rtts[h.round] = (now - sent[h.round]) * 1e3
                    elif isinstance(h, Ack) and h.ref is MsgType.AGGREGATE and h.round == bulk_tid:
                        ok = h.state_hash == self.bodies.digests[len(body)]
                        bulk_acked.set_result((now, ok))
                    else:
                        raise RuntimeError(f"unexpected message {h!r}")

            seq = 0

            async def beat_until(done: Callable[[], bool], lags: list[float]) -> list[int]:
                nonlocal seq
                seqs: list[int] = []
                due = time.perf_counter()
                while not done():
                    seq += 1
                    now = time.perf_counter()
                    lags.append((now - due) * 1e3)
                    sent[seq] = now
                    peer.send(Heartbeat(seq=seq))
                    seqs.append(seq)
                    due += HEARTBEAT_PERIOD_S
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                return seqs

            read_task = asyncio.ensure_future(reader())
            try:
                idle_lags: list[float] = []
                t_end = time.perf_counter() + idle_s
                idle_seqs = await beat_until(lambda: time.perf_counter() >= t_end, idle_lags)

                load_lags: list[float] = []
                bulk_tid = self.tid()
                t0 = time.perf_counter()
                send_task = asyncio.ensure_future(peer.send_bulk(aggregate(bulk_tid, len(body)), body))
                load_seqs = await asyncio.wait_for(beat_until(bulk_acked.done, load_lags), self.args.transfer_timeout)
                await send_task
                t_ack, ok = bulk_acked.result()
                if not ok:
                    raise RuntimeError("control test: bulk body hash mismatch")
                # let the last heartbeats come back
                deadline = time.perf_counter() + 1.0
                while any(s not in rtts for s in load_seqs) and time.perf_counter() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                read_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await read_task
        return {
            "idle": [rtts[s] for s in idle_seqs if s in rtts],
            "idle_lost": sum(s not in rtts for s in idle_seqs),
            "load": [rtts[s] for s in load_seqs if s in rtts],
            "load_lost": sum(s not in rtts for s in load_seqs),
            "load_lag": load_lags,
            "bulk_mbps": len(body) / (t_ack - t0) / MB,
        }


# -- reporting ------------------------------------------------------------------------------------------------


def summarize(
    args: argparse.Namespace,
    client: Client,
    server: ServerProcess,
    hs: dict[str, list[float]] | None,
    ctl: list[dict[str, Any]],
    elapsed: float,
) -> dict[str, Any]:
    large = len(client.bodies.large)
    small = len(client.bodies.small) if client.bodies.small is not None else None

    def mbps(kind: str, dgram: int | None, size: int | None) -> float | None:
        xs = [t.mbps for t in client.transfers if t.kind == kind and t.dgram == dgram and t.size == size]
        return median(xs)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    tls_l, tls_s = mbps("tls", None, large), mbps("tls", None, small)
    out: dict[str, Any] = {
        "quic_mbps": mbps("quic", DEFAULT_DGRAM, large),
        "quic_mbps_1452": mbps("quic", DGRAM_1452, large),
        "quic_mbps_max": mbps("quic", DGRAM_MAX, large),
        "tls_tcp_mbps": tls_l,
        "quic_mbps_16mb": mbps("quic", DEFAULT_DGRAM, small),
        "quic_mbps_1452_16mb": mbps("quic", DGRAM_1452, small),
        "quic_mbps_max_16mb": mbps("quic", DGRAM_MAX, small),
        "tls_tcp_mbps_16mb": tls_s,
    }
    out["quic_vs_tls_tcp"] = ratio(out["quic_mbps"], tls_l)
    out["quic_vs_tls_tcp_1452"] = ratio(out["quic_mbps_1452"], tls_l)
    out["quic_vs_tls_tcp_max"] = ratio(out["quic_mbps_max"], tls_l)
    out["quic_vs_tls_tcp_16mb"] = ratio(out["quic_mbps_16mb"], tls_s)

    def paired(dgram: int, size: int) -> list[float]:
        """QUIC / TLS of the same repetition (minutes apart at most): less sensitive to the machine's mood."""
        by_rep = {(t.kind, t.rep): t.mbps for t in client.transfers if t.size == size and t.dgram in (dgram, None)}
        return [
            by_rep[("quic", r)] / by_rep[("tls", r)]
            for r in range(args.reps)
            if ("quic", r) in by_rep and ("tls", r) in by_rep
        ]

    out["quic_vs_tls_tcp_paired"] = median(paired(DEFAULT_DGRAM, large))
    out["quic_vs_tls_tcp_paired_1452"] = median(paired(DGRAM_1452, large))
    out["quic_vs_tls_tcp_paired_max"] = median(paired(DGRAM_MAX, large))

    out["handshake_ms"] = median(hs["quic"]) if hs else None
    out["handshake_p90_ms"] = percentile(hs["quic"], 90) if hs else None
    out["tls_tcp_handshake_ms"] = median(hs["tls"]) if hs else None
    out["handshake_vs_tls_tcp"] = ratio(out["handshake_ms"], out["tls_tcp_handshake_ms"])
    out["resumed_handshake_ms"] = median(hs["resumed"]) if hs and hs["resumed"] else None
    out["resumed_vs_full_handshake"] = ratio(out["resumed_handshake_ms"], out["handshake_ms"])

    idle = [x for c in ctl for x in c["idle"]]
    load = [x for c in ctl for x in c["load"]]
    lag = [x for c in ctl for x in c["load_lag"]]
    out.update(
        {
            "control_p50_ms": percentile(load, 50),
            "control_p99_ms": percentile(load, 99),
            "control_max_ms": max(load) if load else None,
            "control_samples": len(load),
            "control_lost": sum(c["load_lost"] for c in ctl),
            "control_idle_p50_ms": percentile(idle, 50),
            "control_idle_p99_ms": percentile(idle, 99),
            "control_idle_samples": len(idle),
            "control_idle_lost": sum(c["idle_lost"] for c in ctl),
            "control_send_lag_p99_ms": percentile(lag, 99),
            "control_bulk_mbps": median([c["bulk_mbps"] for c in ctl]),
            "server_loop_lag_p99_ms": server.stats.get("loop_lag_p99_ms"),
            "server_loop_lag_max_ms": server.stats.get("loop_lag_max_ms"),
        }
    )

    checks: dict[str, Any] = {}
    for key, (op, target) in TARGETS.items():
        v = out.get(key)
        ok = v is not None and (v >= target if op == ">=" else v <= target)
        checks[key] = {"value": v, "target": f"{op} {target:g}", "pass": ok}
    rh = out["resumed_handshake_ms"]
    checks["resumed_handshake_ms"] = {
        "value": rh,
        "target": "< handshake_ms",
        "pass": rh is not None and out["handshake_ms"] is not None and rh < out["handshake_ms"],
    }
    out["targets"] = checks
    s = TransportSettings()
    out["config"] = {
        "quick": args.quick,
        "loop": args.loop,
        "client_loop": client.info.get("loop"),
        "server_loop": server.stats.get("loop"),
        "payload_bytes": [b for b in (small, large) if b is not None],
        "warmup_bytes": len(client.bodies.warmup),
        "datagram_sizes": args.sizes,
        "reps": args.reps,
        "handshakes": args.handshakes if hs else 0,
        "socket_buffers_client": client.socket_buffers,
        "socket_buffers_server": server.stats.get("socket_buffers", {}),
        "socket_buffer_requested": s.socket_buffer_bytes,
        "settings": s.model_dump(mode="json", exclude={"limits"}),
        "quic_cipher": client.info.get("quic_cipher"),
        "tls_cipher": client.info.get("tls_cipher"),
        "tls_version": client.info.get("tls_version"),
        "quic_sessions_resumed": client.info.get("quic_sessions_resumed"),
        "transfers": [asdict(t) | {"mbps": t.mbps} for t in client.transfers],
        "quic_backend": f"{get_backend().name} {get_backend().version}",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "profiled": bool(args.profile),
        "elapsed_s": elapsed,
    }
    return out


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(out: dict[str, Any], client: Client) -> None:
    cfg = out["config"]
    large = cfg["payload_bytes"][-1]
    tls = {
        t.size: median([u.mbps for u in client.transfers if u.kind == "tls" and u.size == t.size])
        for t in client.transfers
        if t.kind == "tls"
    }
    print()
    print(f"event loop: client {cfg['client_loop']}, server {cfg['server_loop']}")
    print(f"ciphers: quic {cfg['quic_cipher']}, tls/tcp {cfg['tls_cipher']} ({cfg['tls_version']})")
    print(
        f"UDP socket buffers granted (rcv, snd; requested {cfg['socket_buffer_requested']}): "
        f"client {cfg['socket_buffers_client']}, server {cfg['socket_buffers_server']}"
    )
    print()
    print(
        "acked throughput (median of reps; MB = 1e6 B; cpu = CPU seconds per second of transfer of the client, the"
        " server, and other processes on this machine)"
    )
    print(
        f"{'transport':<22} {'payload':>8} {'MB/s':>8} {'vs tls':>7} {'min':>7} {'max':>7} "
        f"{'cpu cli':>8} {'cpu srv':>8} {'cpu oth':>8}"
    )
    groups: dict[tuple[str, int | None, int], list[Transfer]] = {}
    for t in client.transfers:
        groups.setdefault((t.kind, t.dgram, t.size), []).append(t)
    for (kind, dgram, size), ts in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0] == "tls", kv[0][1] or 0)):
        name = f"quic dgram {dgram}" if kind == "quic" else "tls 1.3 / tcp"
        m = median([t.mbps for t in ts])
        base = tls.get(size)
        vs = m / base if base and m is not None else None
        cc = median([t.client_cpu_s / t.seconds for t in ts])
        sc = median([t.server_cpu_s / t.seconds for t in ts])
        oc = median([t.other_cpu_s / t.seconds for t in ts])
        print(
            f"{name:<22} {size / MiB:>4.0f} MiB {fmt(m):>8} {fmt(vs, '.3f'):>7} "
            f"{fmt(min(t.mbps for t in ts)):>7} {fmt(max(t.mbps for t in ts)):>7} "
            f"{fmt(cc, '.2f'):>8} {fmt(sc, '.2f'):>8} {fmt(oc, '.2f'):>8}"
        )
    print(
        f"QUIC / TLS of the same rep, median over reps ({large / MiB:.0f} MiB): "
        f"dgram {DEFAULT_DGRAM} {fmt(out['quic_vs_tls_tcp_paired'], '.3f')}, "
        f"{DGRAM_1452} {fmt(out['quic_vs_tls_tcp_paired_1452'], '.3f')}, "
        f"{DGRAM_MAX} {fmt(out['quic_vs_tls_tcp_paired_max'], '.3f')}"
    )
    print()
    print(
        f"handshake (median of {cfg['handshakes']}): quic full {fmt(out['handshake_ms'], '.2f')} ms "
        f"(p90 {fmt(out['handshake_p90_ms'], '.2f')}), tls/tcp {fmt(out['tls_tcp_handshake_ms'], '.2f')} ms, "
        f"ratio {fmt(out['handshake_vs_tls_tcp'], '.2f')}; resumed {fmt(out['resumed_handshake_ms'], '.2f')} ms "
        f"({fmt(out['resumed_vs_full_handshake'], '.2f')}x full)"
    )
    print(
        f"control RTT, heartbeat every {HEARTBEAT_PERIOD_S * 1e3:.0f} ms at dgram {DEFAULT_DGRAM}:"
        f"\n  idle:                        p50 {fmt(out['control_idle_p50_ms'], '.2f')} ms  "
        f"p99 {fmt(out['control_idle_p99_ms'], '.2f')} ms  (n={out['control_idle_samples']}, "
        f"lost {out['control_idle_lost']})"
        f"\n  during a {large / MiB:.0f} MiB send_bulk:     p50 {fmt(out['control_p50_ms'], '.2f')} ms  "
        f"p99 {fmt(out['control_p99_ms'], '.2f')} ms  max {fmt(out['control_max_ms'], '.2f')} ms  "
        f"(n={out['control_samples']}, lost {out['control_lost']}; bulk {fmt(out['control_bulk_mbps'])} MB/s; "
        f"send lag p99 {fmt(out['control_send_lag_p99_ms'], '.2f')} ms)"
    )
    print(
        f"server event loop stalls over the run (5 ms timer lateness): p99 {fmt(out['server_loop_lag_p99_ms'], '.2f')}"
        f" ms, max {fmt(out['server_loop_lag_max_ms'], '.2f')} ms"
    )
    print()
    print("targets:")
    for key, c in out["targets"].items():
        verdict = "PASS" if c["pass"] else ("FAIL (not available)" if c["value"] is None else "FAIL")
        print(f"  {key:<22} {fmt(c['value'], '.2f'):>8}  {c['target']:<16} {verdict}")
    if cfg["quick"]:
        print("  (quick: one 4 MiB transfer per configuration; the targets are meant for the full run)")
    print(f"\n({cfg['elapsed_s']:.1f} s, {cfg['quic_backend']}, python {cfg['python']}, {cfg['cpus']} cpus)")


def profile_category(file: str, func: str) -> str:
    """Coarse owner of a profiled function, for the own-time breakdown."""
    if "select.epoll" in func or "'poll'" in func:
        return "epoll wait (idle or waking)"
    if any(k in func for k in ("AESGCM", "ChaCha", "CipherContext")) or file.endswith(
        ("aioquic/_crypto.py", "aioquic/quic/crypto.py")
    ):
        return "crypto (AEAD + header protection)"
    if "sendto" in func or "recvfrom" in func or "'send'" in func or "'recv" in func:
        return "socket syscalls"
    if "/aioquic/" in file or "aioquic._buffer" in func:
        return "aioquic (packets, ACKs, recovery, streams)"
    if "/qh3/" in file or "qh3._hazmat" in func:
        return "qh3 (Python facade and native core)"
    if "_contextvars.Context" in func:
        return "asyncio event loop"
    if file.endswith("/enum.py") or func.startswith("<built-in method builtins."):
        return "builtins + enum (called mostly by aioquic)"
    if "/fedquic/" in file or "/work/main/transport/" in file or "/work/main/common/" in file:
        return "fedquic (framing, Peer, core)"
    if "hashlib" in func or "sha256" in func or "openssl_sha" in func:
        return "sha256 (benchmark)"
    if "/asyncio/" in file or file.endswith("selectors.py"):
        return "asyncio event loop"
    if "/pydantic" in file or "pydantic" in func:
        return "pydantic"
    return "other"


def print_profile(path: Path, title: str, top: int) -> None:
    if not path.exists():
        print(f"(no profile at {path})")
        return
    st = pstats.Stats(str(path))
    cats: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = st.stats  # type: ignore[attr-defined]
    for (file, _line, func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        cat = profile_category(file, func)
        cats[cat] = cats.get(cat, 0.0) + tt
    total = sum(cats.values()) or 1.0
    busy = total - cats.get("epoll wait (idle or waking)", 0.0)
    print(f"\n== profile: {title}: own time by owner ({total:.2f} s profiled, {busy:.2f} s busy) ==")
    for cat, tt in sorted(cats.items(), key=lambda kv: -kv[1]):
        share = "" if cat.startswith("epoll") else f"{100 * tt / busy:5.1f}% of busy"
        print(f"  {cat:<44} {tt:7.2f} s  {share}")
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
    text = buf.getvalue()
    start = text.find("   ncalls")
    print(f"-- top {top} functions by own time --")
    print(text[start:].rstrip() if start >= 0 else text)


# -- main -----------------------------------------------------------------------------------------------------


async def client_main(
    args: argparse.Namespace, server: ServerProcess, pki: DevPki, bodies: Bodies
) -> tuple[Client, dict[str, list[float]] | None, list[dict[str, Any]]]:
    client = Client(args, server, pki, bodies)
    client.info["loop"] = loop_name()
    hs: dict[str, list[float]] | None = None
    ctl: list[dict[str, Any]] = []
    for rep in range(args.reps):
        client.rep = rep
        print(f"rep {rep + 1}/{args.reps}", flush=True)
        if "quic" in args.sections:
            for d in args.sizes:
                await client.quic_throughput(d)
        if "tls" in args.sections:
            await client.tls_throughput()
        if "control" in args.sections:
            ctl.append(await client.control(args.idle_s))
            c = ctl[-1]
            print(
                f"  control: idle p99 {fmt(percentile(c['idle'], 99), '.2f')} ms, under load p50 "
                f"{fmt(percentile(c['load'], 50), '.2f')} / p99 {fmt(percentile(c['load'], 99), '.2f')} ms "
                f"(bulk {c['bulk_mbps']:.1f} MB/s)",
                flush=True,
            )
    if "handshake" in args.sections:
        hs = await client.handshakes(args.handshakes)
    return client, hs, ctl


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--quick", action="store_true", help="4 MiB payloads, 5 handshakes, 1 rep (smoke test)")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop of both processes")
    p.add_argument(
        "--backend", choices=("auto", "aioquic", "qh3"), default="auto", help="QUIC implementation of both processes"
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions per configuration (default 5, quick 1)")
    p.add_argument("--handshakes", type=int, default=None, help="fresh connections timed (default 20, quick 5)")
    p.add_argument("--datagram-sizes", default=f"{DEFAULT_DGRAM},{DGRAM_1452},{DGRAM_MAX}")
    p.add_argument("--sections", default=",".join(SECTIONS), help="subset of " + ",".join(SECTIONS))
    p.add_argument("--idle-s", type=float, default=None, help="idle heartbeat phase per rep (default 2 s, quick 1)")
    p.add_argument("--transfer-timeout", type=float, default=120.0, help="seconds before a transfer is abandoned")
    p.add_argument("--profile", type=Path, default=None, help="cProfile both processes, stats into this folder")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pki", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.handshakes is None:
        args.handshakes = 5 if args.quick else 20
    if args.idle_s is None:
        args.idle_s = 1.0 if args.quick else 2.0
    args.sizes = [int(s) for s in args.datagram_sizes.split(",")]
    args.sections = [s for s in args.sections.split(",") if s]
    if bad := set(args.sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(bad)}")
    if "control" in args.sections or "handshake" in args.sections:
        args.sizes = sorted(set(args.sizes) | {DEFAULT_DGRAM})
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend != "auto":
        os.environ[ENV_VAR] = args.backend  # this process and the server child it starts
    if args.serve:
        return serve(args)
    logging.basicConfig(level=logging.WARNING, format="client %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    large = (4 if args.quick else 64) * MiB
    small = None if args.quick else 16 * MiB
    blob = os.urandom(large)
    bodies = Bodies(large=blob, small=blob[:small] if small else None, warmup=blob[-WARMUP_BYTES:])
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedquic-bench-pki-") as tmp:
        pki = init_dev_pki(Path(tmp))
        server = ServerProcess(pki, args.loop, args.sizes, args.profile)
        prof = cProfile.Profile() if args.profile else None
        try:
            if prof is not None:
                prof.enable()
            client, hs, ctl = run_loop(client_main(args, server, pki, bodies), args.loop)
        finally:
            if prof is not None:
                prof.disable()
                prof.dump_stats(str(args.profile / "client.pstats"))
            server.stop()
    out = summarize(args, client, server, hs, ctl, time.perf_counter() - t_start)
    print_table(out, client)
    if args.profile:
        print_profile(args.profile / "client.pstats", "client (sender)", args.profile_top)
        print_profile(args.profile / "server.pstats", "server (receiver)", args.profile_top)
    if args.json:
        print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
