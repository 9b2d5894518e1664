"""A UDP chaos relay for loopback tests: drops, delays, reorders, duplicates and corrupts datagrams.

This kernel has no netem, so faults are injected in user space: clients dial the relay, which forwards each
client's datagrams to the target from its own upstream socket (the server sees one address per client) and
relays the answers back, applying the configured faults independently in each direction. Seeded: a run is
reproducible up to the event loop's timing.

    python -m testkit.chaos --listen 127.0.0.1:5000 --target 127.0.0.1:4433 --loss 0.05 --delay-ms 25
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    loss: float = 0.0  # probability a datagram is dropped
    delay_ms: float = 0.0  # one-way delay added to every datagram
    jitter_ms: float = 0.0  # uniform extra delay in [0, jitter]
    reorder: float = 0.0  # probability a datagram is held back an extra reorder_ms (overtaken by later ones)
    reorder_ms: float = 20.0
    duplicate: float = 0.0  # probability a datagram is sent twice
    corrupt: float = 0.0  # probability one byte of a datagram is flipped


@dataclass
class Stats:
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    by_direction: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: ChaosRelay, client: Any) -> None:
        self.relay, self.client = relay, client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay._impair(data, "down", lambda d: self.relay._down_send(d, self.client))


class ChaosRelay(asyncio.DatagramProtocol):
    def __init__(self, target: tuple[str, int], faults: Faults, seed: int = 0) -> None:
        self.target = target
        self.faults = faults
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.transport: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Any, _Upstream] = {}
        self._pending: dict[Any, list[bytes]] = {}
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        self.port = int(self.transport.get_extra_info("sockname")[1])
        return self.port

    def close(self) -> None:
        for up in self._upstreams.values():
            if up.transport is not None:
                up.transport.close()
        if self.transport is not None:
            self.transport.close()

    # client -> relay
    def datagram_received(self, data: bytes, addr: Any) -> None:
        up = self._upstreams.get(addr)
        if up is None:
            up = self._upstreams[addr] = _Upstream(self, addr)
            self._pending[addr] = []
            loop = asyncio.get_running_loop()
            task = loop.create_task(loop.create_datagram_endpoint(lambda: up, remote_addr=self.target))
            task.add_done_callback(lambda _t, a=addr: self._flush(a))
        self._impair(data, "up", lambda d: self._up_send(d, addr))

    def _flush(self, addr: Any) -> None:
        for d in self._pending.pop(addr, []):
            self._up_send(d, addr)

    def _up_send(self, data: bytes, addr: Any) -> None:
        up = self._upstreams[addr]
        if up.transport is None:
            self._pending.setdefault(addr, []).append(data)
        else:
            up.transport.sendto(data)

    def _down_send(self, data: bytes, client: Any) -> None:
        if self.transport is not None:
            self.transport.sendto(data, client)

    def _impair(self, data: bytes, direction: str, send: Any) -> None:
        f, rng, st = self.faults, self.rng, self.stats
        if rng.random() < f.loss:
            st.dropped += 1
            return
        if f.corrupt and rng.random() < f.corrupt:
            i = rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            st.corrupted += 1
        copies = 2 if f.duplicate and rng.random() < f.duplicate else 1
        st.duplicated += copies - 1
        for _ in range(copies):
            delay = f.delay_ms + (rng.uniform(0, f.jitter_ms) if f.jitter_ms else 0.0)
            if f.reorder and rng.random() < f.reorder:
                delay += f.reorder_ms
                st.reordered += 1
            st.forwarded += 1
            st.by_direction[direction] += 1
            if delay <= 0:
                send(data)
            else:
                asyncio.get_running_loop().call_later(delay / 1000, send, data)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0))
    ap.add_argument("--target", type=_hostport, required=True)
    for name in ("loss", "delay-ms", "jitter-ms", "reorder", "reorder-ms", "duplicate", "corrupt"):
        ap.add_argument(f"--{name}", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in Faults.__dataclass_fields__ and v is not None}

    async def run() -> None:
        relay = ChaosRelay(args.target, Faults(**given), args.seed)
        port = await relay.start(*args.listen)
        print(f"relaying 127.0.0.1:{port} -> {args.target[0]}:{args.target[1]} with {Faults(**given)}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            relay.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
