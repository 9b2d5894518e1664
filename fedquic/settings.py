"""The client process's settings model: the network client and the built-in learner, one TOML file.

``fedquic client --config client.toml`` reads::

    [client]              # fedquic.client.config.ClientConfig: id, server address, TLS files, run_dir, retries
    client_id = "edge-1"
    host = "fl.example.org"
    [client.tls]
    ca = "certs/ca.pem"   # cert and key default to CA_DIR/clients/CLIENT_ID.{pem,key}
    [learner]             # fedquic.client.peft_learner.PeftLearnerConfig: model, data, profile, quantization
    model_path = "/models/llama"
    data_path = "data/edge-1.jsonl"

then ``FEDQUIC_CLIENT__...`` / ``FEDQUIC_LEARNER__...`` environment variables, then flags. No torch is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from .client.config import ClientConfig
from .client.peft_learner import PeftLearnerConfig
from .common.names import DEV_CERTS_DIR


class ClientProcessConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    client: ClientConfig
    learner: PeftLearnerConfig


def derive_client_defaults(tree: dict[str, Any]) -> None:
    """Defaults that depend on other values: certificate paths and run directory from the client id."""
    client = tree.setdefault("client", {})
    cid = client.get("client_id")
    tls = client.setdefault("tls", {})
    ca = Path(tls.setdefault("ca", f"{DEV_CERTS_DIR}/ca.pem"))
    if cid:
        tls.setdefault("cert", str(ca.parent / "clients" / f"{cid}.pem"))
        tls.setdefault("key", str(ca.parent / "clients" / f"{cid}.key"))
        client.setdefault("run_dir", str(Path("runs") / cid))
