"""The link itself: two TUN devices (one moved into a network namespace of its own), addresses, routes, and the
emulator process (:mod:`testkit.wan.emulator`) that joins them. Needs root (CAP_NET_ADMIN), /dev/net/tun and
``ip``: :func:`unavailable` says why not."""

from __future__ import annotations

import atexit
import fcntl
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from testkit.wan.emulator import LinkParams, exit_on_sigterm

EMULATOR = Path(__file__).with_name("emulator.py")

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MTU = 1500  # a real WAN's, so path-MTU probing finds 1472-byte UDP payloads
_COUNTER = itertools.count()


class WanUnavailable(RuntimeError):
    """The link cannot be built here (not root, no TUN, no network namespaces)."""


def unavailable() -> str | None:
    """Why a :class:`WanLink` cannot be built on this machine, or None."""
    needs = (
        (sys.platform.startswith("linux"), "Linux (TUN devices and network namespaces)"),
        (os.geteuid() == 0, "root (CAP_NET_ADMIN for TUN devices and network namespaces)"),
        (os.path.exists("/dev/net/tun"), "/dev/net/tun"),
        (shutil.which("ip") is not None, "`ip` (iproute2)"),
    )
    return next((f"the WAN link emulator needs {what}" for ok, what in needs if not ok), None)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise WanUnavailable(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _open_tun(name: str) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:  # a container without the device's cgroup permission, say
        raise WanUnavailable(f"/dev/net/tun: {exc}") from exc
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise WanUnavailable(f"TUN device {name}: {exc}") from exc
    return fd


class WanLink:
    """The emulated link: set up on ``open`` / ``with``, torn down on ``close``, at exit and on SIGTERM.

    Open it in the thread that keeps it (the main thread): the emulator exits when that thread does.
    """

    def __init__(
        self,
        rate_mbit: float = 50.0,
        rtt_ms: float = 40.0,
        loss: float = 0.005,
        queue_bytes: int = 256_000,
        seed: int = 0,
        tcp_cc: str | None = None,
        *,
        realtime: bool = True,
    ) -> None:
        self.params = LinkParams(rate_mbit, rtt_ms, loss, queue_bytes, seed, tcp_cc)
        self.realtime = realtime  # the emulator stands for the wire: endpoints' CPU load must not delay it
        n = next(_COUNTER)
        tag = f"{os.getpid() % 100_000}{'' if n == 0 else f'-{n}'}"
        self.ns, self.dev_root, self.dev_ns = f"fqwan-{tag}", f"fqwr{tag}", f"fqwn{tag}"
        octet = (os.getpid() + n) % 250 + 1  # a /30 per link: links of parallel runs do not collide
        self.server_addr, self.client_addr = f"10.77.{octet}.1", f"10.77.{octet}.2"
        self.stats: dict[str, Any] = {}  # the emulator's counters, filled on close
        self._proc: subprocess.Popen[str] | None = None
        self._created_ns = False
        self._old_sigterm: Any = None

    def __enter__(self) -> WanLink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tcp_cc(self) -> str:
        """The TCP congestion control that connections across the link use."""
        return self.params.tcp_cc or Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the link's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def open(self) -> None:
        why = unavailable()
        if why is not None:
            raise WanUnavailable(why)
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM's default action skips atexit and `finally`: make it an exit so the namespace goes too.
            self._old_sigterm = signal.signal(signal.SIGTERM, exit_on_sigterm)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        _ip("netns", "add", self.ns)
        self._created_ns = True
        fds = [_open_tun(self.dev_root), _open_tun(self.dev_ns)]
        try:
            _ip("link", "set", self.dev_ns, "netns", self.ns)
            self._configure()
            cmd = [sys.executable, str(EMULATOR), ",".join(map(str, fds)), json.dumps(asdict(self.params))]
            cmd += ["--realtime"] if self.realtime else []
            self._proc = subprocess.Popen(cmd, pass_fds=fds, stdout=subprocess.PIPE, text=True)
        finally:
            for fd in fds:  # the emulator holds them now: the devices live as long as it does
                os.close(fd)

    def _configure(self) -> None:
        """Point-to-point addresses, MTU, up; with ``tcp_cc`` the congestion control on each end's route."""
        root_end = ((), self.dev_root, self.server_addr, self.client_addr)
        ns_end = (("-n", self.ns), self.dev_ns, self.client_addr, self.server_addr)
        for pre, dev, here, there in (root_end, ns_end):
            _ip(*pre, "addr", "add", here, "peer", there, "dev", dev)
            _ip(*pre, "link", "set", dev, "mtu", str(MTU), "up")
            if self.params.tcp_cc:
                _ip(*pre, "route", "replace", there, "dev", dev, "src", here, "congctl", self.params.tcp_cc)
        _ip("-n", self.ns, "link", "set", "lo", "up")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
            try:
                out, _ = proc.communicate(timeout=10)
                self.stats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            except (subprocess.TimeoutExpired, ValueError):
                proc.kill()
        if self._created_ns:
            self._created_ns = False
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        atexit.unregister(self.close)
