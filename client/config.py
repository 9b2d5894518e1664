"""The client process's settings (``fedquic client``'s flags, TOML and ``FEDQUIC_*`` variables fill them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..transport.settings import TlsFiles, TransportSettings


class ClientConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="this client's id (letters, digits, _ . -)",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=4433, ge=1, le=65535)
    server_name: str | None = Field(default=None, description="name in the server certificate")
    tls: TlsFiles
    transport: TransportSettings = TransportSettings()
    run_dir: Path = Field(default=Path("runs/client"), description="client state and round log")
    message_timeout_s: float = Field(default=3600.0, gt=0)
    # Connecting is retried with exponential backoff and jitter, before the job is joined (clients may start
    # before the server) and after (the server restarted): at most connect_attempts consecutive failures. A
    # refused certificate, identity or schema is not retried.
    connect_attempts: int = Field(default=8, ge=1)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    # Write run_dir/state after every sync and resume from it on start.
    checkpoint: bool = True
    # Write it in a thread of its own (client/checkpointer.py) so the next install or round need not wait for it.
    # Off by default: where the client shares its cores with other busy processes (bench/round.py on 2 cores)
    # the write competes with them and the round took longer (1.84 -> 2.14 s); on a client with cores to spare it
    # takes the 0.2-0.7 s of writing after each sync off the round's path.
    checkpoint_in_background: bool = False
    # Liveness: while waiting for the server, send a HEARTBEAT every heartbeat_s; if what we wrote on the control
    # stream stays unacknowledged by the server's QUIC stack for liveness_timeout_s, the server is gone (killed,
    # rebooted: a dead peer sends no close) and the client reconnects instead of waiting for QUIC's idle timeout.
    heartbeat_s: float = Field(default=5.0, gt=0)
    liveness_timeout_s: float = Field(default=30.0, gt=0)


__all__ = ["ClientConfig"]
