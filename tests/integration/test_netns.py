"""Server and clients in separate network namespaces joined by veth pairs, with iptables dropping 5% of the packets
each namespace receives (a real kernel path, not the loopback relay): every round completes and every update arrives
bit-exact. Needs root (CAP_NET_ADMIN), ``ip`` and ``iptables`` with the ``statistic`` match; skips with the reason
where those are missing (e.g. an unprivileged container)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fedquic.transport.pki import issue_client_cert

pytestmark = pytest.mark.reliability

LOSS = 0.05
CLIENTS = ("ns-a", "ns-b")


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@dataclass
class Topology:
    server_ns: str
    client_ns: dict[str, str]  # client id -> namespace
    server_addr: dict[str, str]  # client id -> the server's address on that client's link
    namespaces: list[str]


def dropped(ns: str) -> int:
    """Packets the random-drop rule in ``ns`` has dropped so far."""
    out = sh("ip", "netns", "exec", ns, "iptables", "-L", "INPUT", "-v", "-n", "-x").stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "statistic" in line and "DROP" in line)


@pytest.fixture
def topology() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN); run as root to include this scenario")
    if not (shutil.which("ip") and shutil.which("iptables")):
        pytest.skip("`ip` (iproute2) and `iptables` are needed for the network-namespace scenario")
    tag = f"fq{os.getpid() % 100_000}"
    server_ns = f"{tag}-srv"
    created: list[str] = []

    def run(*cmd: str) -> None:
        r = sh(*cmd)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    try:
        try:
            run("ip", "netns", "add", server_ns)
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        created.append(server_ns)
        run("ip", "-n", server_ns, "link", "set", "lo", "up")
        client_ns, server_addr = {}, {}
        for i, cid in enumerate(CLIENTS, start=1):
            ns = f"{tag}-c{i}"
            run("ip", "netns", "add", ns)
            created.append(ns)
            here, there = f"{tag}s{i}", f"{tag}c{i}"  # interface names: at most 15 characters
            run("ip", "link", "add", here, "netns", server_ns, "type", "veth", "peer", "name", there, "netns", ns)
            run("ip", "-n", server_ns, "addr", "add", f"10.201.{i}.1/24", "dev", here)
            run("ip", "-n", ns, "addr", "add", f"10.201.{i}.2/24", "dev", there)
            for n, dev in ((server_ns, here), (ns, there), (ns, "lo")):
                run("ip", "-n", n, "link", "set", dev, "up")
            client_ns[cid], server_addr[cid] = ns, f"10.201.{i}.1"
        for ns in created:
            rule = ("-A", "INPUT", "-p", "udp", "-m", "statistic", "--mode", "random")
            r = sh("ip", "netns", "exec", ns, "iptables", *rule, "--probability", str(LOSS), "-j", "DROP")
            if r.returncode != 0:
                pytest.skip(f"iptables random drop is not available: {r.stderr.strip()}")
        yield Topology(server_ns, client_ns, server_addr, created)
    finally:
        for ns in created:
            sh("ip", "netns", "del", ns)  # also removes its veth ends


def test_job_across_namespaces_with_iptables_random_drop(topology: Topology, dev_pki, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ready, run_dir = tmp_path / "ready.json", tmp_path / "server"
    server_log = (tmp_path / "server.log").open("wb")
    in_ns = ("ip", "netns", "exec")
    server = subprocess.Popen(
        [
            *(*in_ns, topology.server_ns, sys.executable, "-m", "fedquic", "server", "--host", "0.0.0.0"),
            *("--port", "0", "--certs", str(dev_pki.root), "--run-dir", str(run_dir), "--ready-file", str(ready)),
            *("--metrics-port", "0", "--rounds", "3", "--min-clients", "2", "--local-steps", "1"),
            *("--uplink", "int8", "--round-timeout", "120"),
        ],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    clients: dict[str, subprocess.Popen[bytes]] = {}
    t0 = time.monotonic()
    try:
        while not ready.is_file():
            assert server.poll() is None and time.monotonic() - t0 < 30, "server did not start"
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        for i, cid in enumerate(CLIENTS):
            issue_client_cert(dev_pki, cid)
            clients[cid] = subprocess.Popen(
                [
                    *(*in_ns, topology.client_ns[cid], sys.executable, "-m", "testkit.synthetic", "--client-id", cid),
                    *("--server", f"{topology.server_addr[cid]}:{port}", "--certs", str(dev_pki.root)),
                    *("--run-dir", str(tmp_path / cid), "--seed", str(i), "--layers", "4", "--dim", "512"),
                    *("--rank", "8", "--log-level", "WARNING"),
                ],
                stdout=(tmp_path / f"{cid}.log").open("wb"),
                stderr=subprocess.STDOUT,
                env=env,
            )
        assert server.wait(240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for cid, p in clients.items():
            assert p.wait(60) == 0, (tmp_path / f"{cid}.log").read_text()[-3000:]
    finally:
        for p in [server, *clients.values()]:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - t0
    drops = {ns: dropped(ns) for ns in topology.namespaces}
    assert all(n > 0 for n in drops.values()), f"the drop rules dropped nothing: {drops}"
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(sorted(h["contributors"]) == sorted(CLIENTS) for h in history)
    for cid in CLIENTS:  # every update applied exactly as the client encoded it
        meta = json.loads((run_dir / "state" / "clients" / cid / "meta.json").read_text())
        line = [x for x in (tmp_path / f"{cid}.log").read_text().splitlines() if x.startswith(f"client={cid} ")][-1]
        assert f"view_hash={meta['view_hash']}" in line and "rounds=[1, 2, 3]" in line, line
    print(f"3/3 rounds bit-exact across namespaces in {elapsed:.1f} s; packets dropped per namespace: {drops}")
