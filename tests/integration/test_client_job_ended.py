"""A client that reaches a server whose job has ended learns it at once and exits 0, without retrying: whether the
server answers HELLO with ERROR JOB_ENDED, or closes the connection with QUIC code 0x100 + JOB_ENDED."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
from fedquic.common.errors import ErrorCode
from fedquic.common.messages import Error, MsgType
from fedquic.transport.aio import FedQuicServer, Peer
from fedquic.transport.pki import issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

pytestmark = pytest.mark.reliability

JOB_ENDED_CLOSE = 0x100 + int(ErrorCode.JOB_ENDED)


async def ended_server(dev_pki, send_error: bool) -> tuple[FedQuicServer, int, list[str]]:  # type: ignore[no-untyped-def]
    """A QUIC server (the real transport, mutual TLS) whose job has ended: it answers HELLO that way."""
    seen: list[str] = []

    async def handler(peer: Peer) -> None:
        msg = await peer.recv(timeout=10)
        seen.append(msg.type.name)
        if msg.type is MsgType.HELLO and send_error:
            peer.send(Error(code=int(ErrorCode.JOB_ENDED), message="job fedquic-job has ended"))
        await peer.aclose(JOB_ENDED_CLOSE, "job ended")

    tls = TlsFiles(ca=dev_pki.ca_cert, cert=dev_pki.server_cert, key=dev_pki.server_key, revoked=None)
    server = FedQuicServer(TransportSettings(), tls, handler)
    return server, await server.start("127.0.0.1", 0), seen


@pytest.mark.parametrize("send_error", [True, False], ids=["error-then-close", "close-only"])
async def test_client_process_exits_0_at_once_when_the_job_has_ended(dev_pki, tmp_path: Path, send_error: bool) -> None:
    issue_client_cert(dev_pki, "late")
    server, port, seen = await ended_server(dev_pki, send_error)
    log = tmp_path / "client.log"
    cmd = [sys.executable, "-m", "testkit.synthetic", "--client-id", "late", "--server", f"127.0.0.1:{port}"]
    cmd += ["--certs", str(dev_pki.root), "--run-dir", str(tmp_path / "late"), "--connect-attempts", "8"]
    earlier = tmp_path / "late" / "rounds.jsonl"  # this client's round log from an earlier job
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"round": 1, "metrics": {}}\n')
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=log.open("wb"), stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        rc = await asyncio.wait_for(proc.wait(), 60)
    finally:
        await server.close()
    took = time.monotonic() - t0
    text = log.read_text()
    assert rc == 0, text
    assert seen == ["HELLO"], (seen, text)  # one connection: no retry
    assert earlier.read_text() == '{"round": 1, "metrics": {}}\n'  # nothing ran: the earlier log is kept
    assert "the job has ended" in text and "retrying in" not in text, text
    assert took < 10, f"the client took {took:.1f} s to give up on an ended job"
