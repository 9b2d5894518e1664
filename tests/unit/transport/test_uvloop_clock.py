"""Under uvloop, aioquic gets a precise clock and timers that never fire before their deadline."""

from __future__ import annotations

import asyncio
import time

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from fedquic.transport.aio import Peer, _PreciseClockLoop
from fedquic.transport.settings import TransportSettings

uvloop = pytest.importorskip("uvloop")


async def _early_fires(loop, n: int = 100) -> int:  # type: ignore[no-untyped-def]
    early = 0
    for _ in range(n):
        when = loop.time() + 0.0002  # the pacer's sub-millisecond deadlines
        fired = asyncio.get_running_loop().create_future()
        loop.call_at(when, lambda f=fired: f.set_result(time.monotonic()))
        early += (await fired) < when
    return early


def test_under_uvloop_peers_get_a_precise_clock_whose_timers_never_fire_early() -> None:
    async def main() -> tuple[int, bool]:
        real = asyncio.get_running_loop()
        # uvloop alone rounds a 0.2 ms delay to 0 and fires at once; the proxy must round it up
        proxied = await _early_fires(_PreciseClockLoop(real))
        cfg = QuicConfiguration(is_client=True)
        peer = Peer(QuicConnection(configuration=cfg), settings=TransportSettings())
        return proxied, isinstance(peer._loop, _PreciseClockLoop)

    proxied, installed = uvloop.run(main())
    assert proxied == 0
    assert installed


def test_asyncio_peers_keep_the_real_loop() -> None:
    async def main() -> bool:
        peer = Peer(QuicConnection(configuration=QuicConfiguration(is_client=True)), settings=TransportSettings())
        return isinstance(peer._loop, _PreciseClockLoop)

    assert asyncio.run(main()) is False
