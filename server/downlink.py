"""What the server sends a client each round: the change from what the client holds to its target.

The server knows exactly what each client holds (the client acknowledges the hash of every adapter it installs),
so it encodes ``C(target − held)`` and the client installs ``held + D(C(target − held))``. Whatever compression
drops this round is still missing from ``held`` and therefore part of next round's difference: the difference
against the held copy *is* the error feedback, and nothing pruned is lost for good. A separate residual must not be
added on top — it would count the dropped mass twice (it is already absent from ``held``), which made the client's
Rest-of-World diverge from its target (relative L2 error 0.84 → 3.32 over 10 top-k 10% rounds).

With error feedback switched off (a measurement switch, to show what it buys) the change is taken against the
target sent last time instead of against what the client holds, so what compression drops is lost for good.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.adapter import TensorDict
from ..common.codec import EncodingSpec, Payload, encode_payload


@dataclass(frozen=True)
class DownlinkChange:
    payload: Payload
    held_after: TensorDict  # what the client holds once it adds the decoded payload (float32, tensor by tensor)


def downlink_change(
    held: TensorDict, target: TensorDict, spec: EncodingSpec, *, reference: TensorDict | None = None
) -> DownlinkChange:
    """Encode ``target − reference`` (``reference`` defaults to ``held``: error-compensated); pure numpy."""
    ref = held if reference is None else reference
    payload = encode_payload({k: target[k] - ref[k] for k in target}, spec)
    return DownlinkChange(payload, {k: held[k] + payload.decoded[k] for k in held})
