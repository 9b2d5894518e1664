"""Measurements across a :class:`testkit.wan.WanLink`: TCP goodput, UDP round trips, UDP loss.

Each probe has two halves: the root side (the functions here) and the namespace side, this file run as a script
inside the link's namespace (standard library only):

    python probes.py KIND HOST PORT ARGS...
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testkit.wan.link import WanLink


def _probe_cmd(link: WanLink, *args: object) -> list[str]:
    return link.wrap([sys.executable, str(Path(__file__).resolve()), *map(str, args)])


def tcp_mbit(link: WanLink, nbytes: int = 8_000_000, direction: str = "up") -> float:
    """Goodput of one TCP transfer across the link (Mbit/s of payload, first byte to last)."""
    with socket.create_server((link.server_addr, 0)) as srv:
        role = "tcp-send" if direction == "up" else "tcp-recv"
        cmd = _probe_cmd(link, role, link.server_addr, srv.getsockname()[1], nbytes)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        srv.settimeout(30)
        conn, _ = srv.accept()
        with conn:
            if direction == "up":
                first, last, got = _drain(conn, nbytes)
                proc.wait(timeout=30)
                return got * 8 / max(last - first, 1e-9) / 1e6
            conn.sendall(bytes(nbytes))
        out, _ = proc.communicate(timeout=60)
        return float(json.loads(out)["mbit_s"])


def _drain(conn: socket.socket, nbytes: int) -> tuple[float, float, int]:
    conn.settimeout(60)
    got, first = 0, 0.0
    while got < nbytes:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        first = first or time.monotonic()
        got += len(chunk)
    return first, time.monotonic(), got


def udp_rtt_ms(link: WanLink, count: int = 40) -> list[float]:
    """Round-trip times of small UDP datagrams echoed from the root side (lost ones are left out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((link.server_addr, 0))
        s.settimeout(0.2)
        proc = subprocess.Popen(_probe_cmd(link, "udp-ping", *s.getsockname(), count), stdout=subprocess.PIPE)
        while proc.poll() is None:
            try:
                data, addr = s.recvfrom(2048)
            except TimeoutError:
                continue
            s.sendto(data, addr)
        out, _ = proc.communicate(timeout=10)
    return [float(x) for x in json.loads(out)["rtt_ms"]]


def udp_loss(link: WanLink, count: int = 10_000, size: int = 100) -> float:
    """One-way (up) loss rate of ``count`` datagrams, paced well below the rate so the queue drops none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((link.server_addr, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.settimeout(max(link.params.rtt_ms / 1000 * 4, 0.5))
        pps = max(link.params.rate_mbit * 1e6 / 8 / (size + 28) / 4, 100.0)  # a quarter of the link's rate
        proc = subprocess.Popen(_probe_cmd(link, "udp-blast", *s.getsockname(), count, size, pps))
        seen: set[int] = set()
        while True:
            try:
                seen.add(int.from_bytes(s.recv(2048)[:4], "big"))
            except TimeoutError:
                if proc.poll() is not None:
                    break
        proc.wait(timeout=10)
    return 1 - len(seen) / count


def check(link: WanLink, nbytes: int = 8_000_000) -> dict[str, Any]:
    """A self-check of the link: TCP goodput both ways, UDP round trips, UDP loss (JSON-ready)."""
    rtts = sorted(udp_rtt_ms(link))
    return {
        "tcp_up_mbit_s": tcp_mbit(link, nbytes, "up"),
        "tcp_down_mbit_s": tcp_mbit(link, nbytes, "down"),
        "udp_rtt_ms_median": rtts[len(rtts) // 2] if rtts else None,
        "udp_rtt_ms_min": rtts[0] if rtts else None,
        "udp_loss_up": udp_loss(link),
    }


def _probe_main(kind: str, args: list[str]) -> int:
    """The namespace side of a probe (run inside the link's namespace by the functions above)."""
    host, port = args[0], int(args[1])
    if kind in ("tcp-send", "tcp-recv"):
        with socket.create_connection((host, port), timeout=30) as c:
            if kind == "tcp-send":
                c.sendall(bytes(int(args[2])))
                return 0
            first, last, got = _drain(c, int(args[2]))
        print(json.dumps({"mbit_s": got * 8 / max(last - first, 1e-9) / 1e6}))
    elif kind == "udp-ping":
        print(json.dumps({"rtt_ms": _ping(host, port, int(args[2]))}))
    elif kind == "udp-blast":
        _blast(host, port, int(args[2]), int(args[3]), float(args[4]))
    return 0


def _ping(host: str, port: int, count: int) -> list[float]:
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.settimeout(1.0)
        for i in range(count):
            t = time.monotonic()
            s.send(i.to_bytes(4, "big"))
            try:
                while int.from_bytes(s.recv(64)[:4], "big") != i:
                    pass
            except TimeoutError:
                continue
            out.append((time.monotonic() - t) * 1e3)
            time.sleep(0.01)
    return out


def _blast(host: str, port: int, count: int, size: int, pps: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        t0, pad = time.monotonic(), bytes(max(size - 4, 0))
        for i in range(count):
            s.send(i.to_bytes(4, "big") + pad)
            ahead = t0 + (i + 1) / pps - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


if __name__ == "__main__":
    raise SystemExit(_probe_main(sys.argv[1], sys.argv[2:]))
