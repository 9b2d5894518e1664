"""Server metrics: counters the daemon updates, a Prometheus text rendering, and a tiny HTTP endpoint.

The endpoint is a few lines over ``asyncio.start_server`` rather than a dependency: GET ``/metrics``
(Prometheus text format 0.0.4), ``/status`` (JSON for ``fedquic status``) and ``/healthz``. It binds to
localhost by default; requests are bounded (one line of at most 8 KiB, headers ignored, 5 s to send them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..common.errors import ErrorCode

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8192
REQUEST_TIMEOUT_S = 5.0


@dataclass
class ServerMetrics:
    round: int = 0
    rounds_completed: int = 0
    updates_accepted: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    aggregate_seconds: float = 0.0
    uploads_in_flight: int = 0
    uploads_in_flight_max: int = 0
    uploads_waiting: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # error code name -> count

    def reject(self, code: ErrorCode) -> None:
        self.rejected[code.name] = self.rejected.get(code.name, 0) + 1


def render_prometheus(m: ServerMetrics, *, connected: int, known: int, phase: str) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP fedquic_{name} {help_}")
        lines.append(f"# TYPE fedquic_{name} {kind}")
        for labels, value in samples:
            lines.append(f"fedquic_{name}{labels} {value:g}")

    metric("round", "gauge", "The current round.", [("", m.round)])
    metric("rounds_completed_total", "counter", "Rounds aggregated.", [("", m.rounds_completed)])
    metric("clients_connected", "gauge", "Connected clients.", [("", connected)])
    metric("clients_known", "gauge", "Clients with state on disk.", [("", known)])
    metric("updates_accepted_total", "counter", "Updates persisted and acknowledged.", [("", m.updates_accepted)])
    metric("bytes_received_total", "counter", "Application bytes received (frames).", [("", m.bytes_in)])
    metric("bytes_sent_total", "counter", "Application bytes sent in aggregates and resets.", [("", m.bytes_out)])
    metric("aggregation_seconds_total", "counter", "Time spent aggregating.", [("", m.aggregate_seconds)])
    metric("uploads_in_flight", "gauge", "Upload slots granted and not yet released.", [("", m.uploads_in_flight)])
    metric("uploads_waiting", "gauge", "Clients waiting for an upload slot.", [("", m.uploads_waiting)])
    metric(
        "rejected_messages_total",
        "counter",
        "Messages and connections refused, by error code.",
        [(f'{{code="{code}"}}', n) for code, n in sorted(m.rejected.items())] or [('{code="none"}', 0)],
    )
    metric("phase", "gauge", "The round phase (1 for the current one).", [(f'{{phase="{phase}"}}', 1)])
    return "\n".join(lines) + "\n"


class MetricsEndpoint:
    """``GET /metrics``, ``/status``, ``/healthz`` on a TCP port (0 picks a free one)."""

    def __init__(self, metrics_text: Callable[[], str], status: Callable[[], dict[str, Any]]) -> None:
        self._metrics_text = metrics_text
        self._status = status
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_LINE)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 and parts[0] == "GET" else None
            if path == "/metrics":
                self._reply(writer, 200, "text/plain; version=0.0.4", self._metrics_text())
            elif path == "/status":
                self._reply(writer, 200, "application/json", json.dumps(self._status()))
            elif path == "/healthz":
                self._reply(writer, 200, "text/plain", "ok\n")
            elif path is None:
                self._reply(writer, 405, "text/plain", "only GET\n")
            else:
                self._reply(writer, 404, "text/plain", "try /metrics, /status or /healthz\n")
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, status: int, ctype: str, body: str) -> None:
        data = body.encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + data)
