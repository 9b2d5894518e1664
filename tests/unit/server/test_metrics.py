from __future__ import annotations

import asyncio

from fedquic.common.errors import ErrorCode
from fedquic.server.metrics import MetricsEndpoint, ServerMetrics, render_prometheus


def test_prometheus_text_has_every_series_with_labels() -> None:
    m = ServerMetrics(round=4, rounds_completed=3, updates_accepted=7, bytes_in=1000, bytes_out=2500)
    m.reject(ErrorCode.LATE_UPDATE)
    m.reject(ErrorCode.LATE_UPDATE)
    m.reject(ErrorCode.CERTIFICATE)
    text = render_prometheus(m, connected=2, known=5, phase="training")
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples["fedquic_round"] == "4"
    assert samples["fedquic_clients_connected"] == "2"
    assert samples["fedquic_clients_known"] == "5"
    assert samples["fedquic_bytes_sent_total"] == "2500"
    assert samples['fedquic_rejected_messages_total{code="LATE_UPDATE"}'] == "2"
    assert samples['fedquic_rejected_messages_total{code="CERTIFICATE"}'] == "1"
    assert samples['fedquic_phase{phase="training"}'] == "1"
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            assert line.split()[-1] in ("gauge", "counter")


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_endpoint_serves_metrics_status_and_refuses_the_rest() -> None:
    ep = MetricsEndpoint(lambda: "fedquic_round 1\n", lambda: {"round": 1})
    port = await ep.start("127.0.0.1", 0)
    try:
        r = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 200") and r.endswith(b"fedquic_round 1\n")
        r = await _get(port, b"GET /status HTTP/1.1\r\n\r\n")
        assert r.endswith(b'{"round": 1}')
        assert (await _get(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _get(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert await _get(port, b"G" * 20000) == b""  # an over-long request line is dropped, not buffered
    finally:
        await ep.close()
