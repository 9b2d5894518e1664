"""``python -m testkit.wan``: bring a link up, measure it (``--check``) or run a command with it (``-- CMD``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict

from testkit.wan import __doc__ as WAN_DOC
from testkit.wan.link import WanLink, unavailable
from testkit.wan.probes import check


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:
        argv, cmd = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    ap = argparse.ArgumentParser(description=WAN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate-mbit", type=float, default=50.0)
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--loss", type=float, default=0.005)
    ap.add_argument("--queue-kb", type=float, default=256.0, help="drop-tail limit of each direction, kB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tcp-cc", help="TCP congestion control across the link (default: the system's)")
    ap.add_argument("--check", action="store_true", help="measure the link (TCP, UDP RTT, loss) and print JSON")
    args = ap.parse_args(argv)
    why = unavailable()
    if why is not None:
        raise SystemExit(f"testkit.wan: {why}")
    p = (args.rate_mbit, args.rtt_ms, args.loss, int(args.queue_kb * 1000), args.seed, args.tcp_cc)
    with WanLink(*p) as link:
        print(f"link {link.params}: namespace {link.ns}, root side {link.server_addr}, its side {link.client_addr}")
        if args.check:
            print(json.dumps({"params": asdict(link.params), "tcp_cc": link.tcp_cc, **check(link)}), flush=True)
            return 0
        if not cmd:
            print("Ctrl-C to take it down", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
        env = {**os.environ, "FQWAN_NS": link.ns, "FQWAN_SERVER_ADDR": link.server_addr}
        return subprocess.run(cmd, env={**env, "FQWAN_CLIENT_ADDR": link.client_addr}).returncode


if __name__ == "__main__":
    raise SystemExit(main())
