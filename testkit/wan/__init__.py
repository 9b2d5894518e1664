"""A constrained link (rate, delay, loss, a drop-tail queue) that QUIC and TCP both cross, packet by packet.

This kernel has no netem, and a byte-stream TCP relay cannot make TCP see loss (each leg would be lossless
loopback TCP). So the link is emulated in user space below both protocols: two TUN devices, one in the root
network namespace and one moved into a namespace of its own, joined by an emulator process that reads every IP
packet from one device and writes it to the other after, per direction,

1. random loss (seeded),
2. a rate limit as a serialisation queue: departure = max(now, last departure) + size * 8 / rate, and drop-tail
   when the bytes waiting would exceed ``queue_bytes`` (default about one bandwidth-delay product of 50 Mbit/s
   x 40 ms),
3. a fixed one-way propagation delay (RTT / 2), then delivery at the arrival time.

With a fixed delay each direction stays FIFO, so a deque per direction replaces a heap, and one timer (the
earlier head of the two) drives delivery. Sizes are IP packet sizes (no link-layer framing). Both devices have
MTU 1500, a real WAN's, so path-MTU probing finds 1472-byte UDP payloads.

Processes started with :meth:`WanLink.wrap` run inside the namespace and reach the root side at
``link.server_addr``; the root side reaches them at ``link.client_addr``. Needs root (CAP_NET_ADMIN),
/dev/net/tun and ``ip``: :func:`unavailable` says why not.

    with WanLink(rate_mbit=50, rtt_ms=40, loss=0.005, seed=0) as link:
        subprocess.run(link.wrap(["python", "client.py", "--host", link.server_addr]))

    python -m testkit.wan --rate-mbit 50 --rtt-ms 40 --loss 0.005 --check   # measure the link, print JSON
    python -m testkit.wan --rate-mbit 50 -- CMD...   # CMD in the root namespace; FQWAN_NS etc. in its environment

Modules: :mod:`~testkit.wan.link` (devices, namespace, routes), :mod:`~testkit.wan.emulator` (the forwarding
process), :mod:`~testkit.wan.probes` (the self-check), ``__main__`` (the command line).
"""

from testkit.wan.emulator import LinkParams
from testkit.wan.link import WanLink, WanUnavailable, unavailable
from testkit.wan.probes import check, tcp_mbit, udp_loss, udp_rtt_ms

__all__ = ["LinkParams", "WanLink", "WanUnavailable", "check", "tcp_mbit", "udp_loss", "udp_rtt_ms", "unavailable"]
