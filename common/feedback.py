"""Error feedback: one residual buffer for every lossy channel (client uplink, server downlink per client).

EF-SGD (arXiv 1901.09847): p = Δ + e; send C(p); e ← p − D(C(p)). Whatever compression drops in one round
stays in ``e`` and is sent later, so after T rounds ``Σ sent + e == Σ Δ`` up to float rounding: nothing
pruned or rounded away is lost for good.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .codec import EncodingSpec, Payload, encode_payload


class ErrorFeedback:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.residual: dict[str, np.ndarray] = {}

    def compress(self, delta: Mapping[str, np.ndarray], spec: EncodingSpec) -> Payload:
        """Encode ``delta`` plus the carried residual; keep what the payload does not carry."""
        if not self.enabled:
            return encode_payload(delta, spec)
        p = {
            k: (v + self.residual[k]) if k in self.residual else np.array(v, dtype=np.float32) for k, v in delta.items()
        }
        payload = encode_payload(p, spec)
        self.residual = {k: p[k] - payload.decoded[k] for k in p}
        return payload

    def residual_norm(self) -> float:
        return float(np.sqrt(sum(float(np.square(r, dtype=np.float64).sum()) for r in self.residual.values())))
