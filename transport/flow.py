"""Bounded flow-control windows for aioquic 1.7.

aioquic doubles a receive window (connection MAX_DATA, stream MAX_STREAM_DATA) whenever the peer has used half
of it, with no upper bound: after a 1 GB transfer the peer is allowed ~1 GB more in flight, which is memory a
slow reader must be ready to buffer. We replace the doubling by a sliding window of fixed size, the configured
``max_data`` / ``max_stream_data``: when the peer has used half its credit, the limit moves to
``received + window``. So the credit never exceeds the configured window, and throughput is unchanged for a
window of a few bandwidth-delay products (16 MiB / 8 MiB by default).

Tied to the pinned ``aioquic==1.7.*`` (it wraps two private methods of ``QuicConnection``); :func:`cap_windows`
installs the wrappers once per connection.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.connection import QuicConnection


def cap_windows(quic: QuicConnection) -> None:
    """Give ``quic`` fixed-size sliding receive windows instead of aioquic's unbounded doubling."""
    conn_window = quic.configuration.max_data
    stream_window = quic.configuration.max_stream_data
    write_conn = quic._write_connection_limits
    write_stream = quic._write_stream_limits

    def write_connection_limits(builder: Any, space: Any) -> None:
        lim = quic._local_max_data
        if lim.value - lim.used < conn_window // 2:
            lim.value = lim.used + conn_window
        used, lim.used = lim.used, 0  # hides aioquic's doubling test; it only writes the frame
        try:
            write_conn(builder, space)
        finally:
            lim.used = used

    def write_stream_limits(builder: Any, space: Any, stream: Any) -> None:
        if stream.max_stream_data_local:
            received = stream.receiver.highest_offset
            if stream.max_stream_data_local - received < stream_window // 2:
                stream.max_stream_data_local = received + stream_window
            stream.receiver.highest_offset = 0  # as above: only the frame is aioquic's
            try:
                write_stream(builder=builder, space=space, stream=stream)
            finally:
                stream.receiver.highest_offset = received
        else:
            write_stream(builder=builder, space=space, stream=stream)

    quic._write_connection_limits = write_connection_limits  # type: ignore[method-assign]
    quic._write_stream_limits = write_stream_limits  # type: ignore[method-assign]
