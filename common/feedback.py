"""Error feedback: one residual buffer for every lossy channel (client uplink, server downlink per client).

EF-SGD (arXiv 1901.09847): p = Δ + e; send C(p); e ← p − D(C(p)). Whatever compression drops in one round
stays in ``e`` and is sent later, so after T rounds ``Σ sent + e == Σ Δ`` up to float rounding: nothing
pruned or rounded away is lost for good.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np

from .codec import EncodingSpec, Payload, encode_payload


class ErrorFeedback:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.residual: dict[str, np.ndarray] = {}

    def compress(
        self,
        delta: Mapping[str, np.ndarray],
        spec: EncodingSpec,
        select: Callable[[Mapping[str, np.ndarray]], Collection[str]] | None = None,
    ) -> Payload:
        """Encode ``delta`` plus the carried residual; keep what the payload does not carry. ``select`` (layerwise
        routing, common/routing.py) picks the tensors sent this round from the pending values; the others are
        carried whole to the next round (so routing needs error feedback on)."""
        if not self.enabled:
            if select is not None:
                raise ValueError("routing without error feedback would drop the blocks it does not send")
            return encode_payload(delta, spec)
        p = {
            k: (v + self.residual[k]) if k in self.residual else np.array(v, dtype=np.float32) for k, v in delta.items()
        }
        sent = set(p) if select is None else set(select(p))
        payload = encode_payload({k: p[k] for k in sorted(sent)}, spec)
        self.residual = {k: p[k] - payload.decoded[k] if k in sent else p[k] for k in p}
        return payload

    def residual_norm(self) -> float:
        return float(np.sqrt(sum(float(np.square(r, dtype=np.float64).sum()) for r in self.residual.values())))
