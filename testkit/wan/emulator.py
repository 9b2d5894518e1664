"""The emulator process of :mod:`testkit.wan`: packets from one TUN device to the other, each direction through
random loss, a drop-tail serialisation queue at the link's rate and a fixed one-way delay (the package's
docstring has the model). A deque per direction (a fixed delay keeps each FIFO) and one timer drive it.

Standard library only, run as a script by :class:`testkit.wan.WanLink` (which passes it the two device fds):

    python emulator.py FD_ROOT,FD_NS PARAMS_JSON [--realtime]

It prints its counters as one JSON line when SIGTERM stops it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import random
import resource
import select
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LinkParams:
    rate_mbit: float = 50.0
    rtt_ms: float = 40.0
    loss: float = 0.005  # per packet, each direction
    queue_bytes: int = 256_000  # drop-tail limit of each direction's queue
    seed: int = 0
    # TCP congestion control across the link (a per-route `congctl`, both ends), None: the system's default.
    # It decides what TCP makes of random loss: at 0.5 % cubic and reno get ~5 of 50 Mbit/s, bbr ~45.
    tcp_cc: str | None = None


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as an exit (its default action skips atexit and ``finally``)."""
    raise SystemExit(128 + signum)


EARLY_S = 50e-6  # deliver a packet due this soon now rather than sleep for less than the timer's slack
READ_BURST = 64  # packets read from one device before the other gets its turn and due packets go out


class _Direction:
    """One direction of the link: loss, then the serialisation queue, then the propagation delay."""

    def __init__(self, dst: int, p: LinkParams, rng: random.Random) -> None:
        self.dst, self.rng = dst, rng
        self.loss, self.queue_bytes = p.loss, p.queue_bytes
        self.bytes_per_s = p.rate_mbit * 1e6 / 8
        self.delay = p.rtt_ms / 2000
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.last_departure = 0.0
        self.c = dict.fromkeys(("received", "lost", "queue_drops", "delivered", "bytes", "write_errors"), 0)
        self.late = dict.fromkeys(("over_1ms", "over_5ms", "over_20ms"), 0)
        self.late_max_s = 0.0

    def offer(self, pkt: bytes, now: float) -> None:
        self.c["received"] += 1
        if self.loss and self.rng.random() < self.loss:
            self.c["lost"] += 1
            return
        start = max(now, self.last_departure)
        if (start - now) * self.bytes_per_s + len(pkt) > self.queue_bytes:
            self.c["queue_drops"] += 1
            return
        self.last_departure = start + len(pkt) / self.bytes_per_s
        self.queue.append((self.last_departure + self.delay, pkt))

    def deliver(self, now: float) -> float | None:
        """Write every packet due by ``now``; the arrival time of the next one, or None."""
        q = self.queue
        while q and q[0][0] <= now + EARLY_S:
            due, pkt = q.popleft()
            late = now - due
            if late > 1e-3:  # how far the emulator fell behind its schedule: its own limit, not the link's
                self.late["over_1ms"] += 1
                self.late["over_5ms"] += late > 5e-3
                self.late["over_20ms"] += late > 20e-3
                self.late_max_s = max(self.late_max_s, late)
            try:
                os.write(self.dst, pkt)
            except OSError:  # the stack's input queue is full: the packet is lost, as on a real NIC
                self.c["write_errors"] += 1
                continue
            self.c["delivered"] += 1
            self.c["bytes"] += len(pkt)
        return q[0][0] if q else None

    def summary(self, elapsed: float) -> dict[str, Any]:
        loss_rate = self.c["lost"] / max(self.c["received"], 1)
        mbit = self.c["bytes"] * 8 / max(elapsed, 1e-9) / 1e6
        return {
            **self.c,
            "loss_rate": loss_rate,
            "mbit_s_mean": mbit,
            "late": {**self.late, "max_ms": self.late_max_s * 1e3},
        }


def _prefer_cpu(realtime: bool) -> None:
    """Run ahead of the endpoints: SCHED_FIFO (the kernel's RT throttling still leaves others 5 %), else nice."""
    try:
        if realtime:
            return os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        pass
    with contextlib.suppress(OSError):
        os.nice(-10)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if whoever set the link up is killed outright, the devices go with us.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def emulate(fd_root: int, fd_ns: int, p: LinkParams) -> dict[str, Any]:
    """Forward packets between the two devices until SIGTERM; the counters of both directions."""
    up = _Direction(fd_root, p, random.Random(p.seed * 2 + 1))  # namespace -> root (client -> server)
    down = _Direction(fd_ns, p, random.Random(p.seed * 2))
    by_fd = {fd_ns: up, fd_root: down}
    for fd in by_fd:
        os.set_blocking(fd, False)
    t0 = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            heads = [t for t in (up.deliver(now), down.deliver(now)) if t is not None]
            timeout = max(min(heads) - now, 0.0) if heads else None
            ready, _, _ = select.select(list(by_fd), [], [], timeout)  # microsecond timeouts, unlike poll/epoll
            now = time.monotonic()
            for fd in ready:
                d = by_fd[fd]
                for _ in range(READ_BURST):
                    try:
                        pkt = os.read(fd, 65535)
                    except BlockingIOError:
                        break
                    d.offer(pkt, now)
    except SystemExit:
        pass
    elapsed, ru = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
    out = {"params": asdict(p), "elapsed_s": elapsed, "cpu_s": ru.ru_utime + ru.ru_stime}
    return {**out, "up": up.summary(elapsed), "down": down.summary(elapsed)}


def main(argv: list[str]) -> int:
    fd_root, fd_ns = (int(x) for x in argv[0].split(","))
    params = LinkParams(**json.loads(argv[1]))
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the owner stops us, by SIGTERM
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    _prefer_cpu("--realtime" in argv[2:])
    print(json.dumps(emulate(fd_root, fd_ns, params)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
