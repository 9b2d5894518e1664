"""testkit.wan's emulated link does what it is configured to: TCP through it runs at about the rate, a UDP echo
takes about the RTT, datagrams are lost at about the loss rate, and nothing of it is left once it is closed.
Needs root, /dev/net/tun and network namespaces; skips with the reason where one is missing."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest

from testkit import wan

MakeLink = Callable[..., AbstractContextManager[wan.WanLink]]


@pytest.fixture
def make_link() -> MakeLink:
    why = wan.unavailable()
    if why is not None:
        pytest.skip(why)

    @contextmanager
    def make(**params: object) -> Iterator[wan.WanLink]:
        link = wan.WanLink(**params)  # type: ignore[arg-type]
        try:
            link.open()
        except wan.WanUnavailable as exc:
            pytest.skip(f"cannot build the link here: {exc}")
        try:
            yield link
        finally:
            link.close()

    return make


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_tcp_rate_and_udp_rtt(make_link: MakeLink) -> None:
    with make_link(rate_mbit=20, rtt_ms=40, loss=0.0) as link:
        up = wan.tcp_mbit(link, 6_000_000, "up")
        down = wan.tcp_mbit(link, 6_000_000, "down")
        rtts = sorted(wan.udp_rtt_ms(link, 20))
        ns, dev = link.ns, link.dev_root
        assert ns in _namespaces() and dev in _links()
    # Goodput: at most the rate less the IP and TCP headers (~3.5 % at MTU 1500), slow start included.
    assert 0.7 * 20 <= up <= 1.1 * 20, up
    assert 0.7 * 20 <= down <= 1.1 * 20, down
    assert len(rtts) >= 18
    assert 40 <= rtts[len(rtts) // 2] <= 46, rtts  # the propagation delay plus the emulator's timer and the stack
    # The emulator kept up: hardly a packet went out more than 5 ms late, and none was refused.
    for direction in ("up", "down"):
        st = link.stats[direction]
        assert st["delivered"] > 1000 and st["write_errors"] == 0 and st["lost"] == 0
        assert st["late"]["over_5ms"] <= st["delivered"] * 0.01, st
    # Torn down: the namespace and both devices are gone.
    assert ns not in _namespaces() and dev not in _links()


def test_udp_loss_rate(make_link: MakeLink) -> None:
    count, loss = 8000, 0.05
    with make_link(rate_mbit=50, rtt_ms=10, loss=loss, seed=3) as link:
        measured = wan.udp_loss(link, count)
    # 8000 datagrams at 5 %: 400 expected, standard deviation ~19.5; +-4 sigma.
    assert 0.04 <= measured <= 0.06, measured
    st = link.stats["up"]
    assert st["queue_drops"] == 0  # paced below the rate: every loss is the random one
    assert st["lost"] / st["received"] == pytest.approx(measured, abs=0.005)


def test_tcp_congestion_control_per_route(make_link: MakeLink) -> None:
    with make_link(rate_mbit=50, rtt_ms=20, loss=0.0, tcp_cc="reno") as link:
        routes = subprocess.run(["ip", "route", "show", link.client_addr], capture_output=True, text=True).stdout
        inside = subprocess.run(link.wrap(["ip", "route", "show", link.server_addr]), capture_output=True, text=True)
        assert link.tcp_cc == "reno"
    assert "congctl reno" in routes and "congctl reno" in inside.stdout


def test_without_root_it_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wan.link.os, "geteuid", lambda: 1000)
    assert "root" in (wan.unavailable() or "")
    with pytest.raises(wan.WanUnavailable, match="root"):
        wan.WanLink().open()
