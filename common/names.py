"""The names both sides of a job agree on, defined once (stdlib only, so the CLI can take its choices from here
without importing numpy or pydantic).

The server's job config, WELCOME, the client's FedALT layer, the store and the CLI's ``choices`` all take them
from this module.
"""

from __future__ import annotations

from typing import Literal, get_args

# What the client trains and installs: FedALT (own LoRA + Rest-of-World LoRA + mixer), FedAvg (one shared LoRA)
# or local only (no tensors exchanged). See fedquic.client.fedalt.
Federation = Literal["fedalt", "fedavg", "local"]
FEDERATIONS: tuple[str, ...] = get_args(Federation)

# FedALT's mixer between the own adapter and the RoW: fixed weights or a learned per-token router.
Mixer = Literal["fixed", "learned", "rff"]
MIXERS: tuple[str, ...] = get_args(Mixer)

# The learned mixer's default starting weight on the client's own adapter. 0.5 is the FedALT paper's neutral
# start, which halves the own adapter's scale against local training; measured (docs/benchmarks.md): 0.9 is
# better when clients' tasks differ, 0.5 when they share one (label skew).
MIXER_INIT = 0.9

# What an AGGREGATE carries: a Rest-of-World LoRA (FedALT) or the global LoRA (FedAvg).
AdapterKind = Literal["row", "global"]
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)

# Where the development PKI lives by default (`fedquic certs init`, the server's --certs, the client's --ca).
DEV_CERTS_DIR = "certs/dev"

__all__ = [
    "ADAPTER_KINDS",
    "DEV_CERTS_DIR",
    "FEDERATIONS",
    "MIXERS",
    "MIXER_INIT",
    "AdapterKind",
    "Federation",
    "Mixer",
]
