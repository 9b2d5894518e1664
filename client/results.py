"""What a client job produces: per-round records, the job's result, and the figures it reports."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, float]
    bytes_up: int = 0
    bytes_down: int = 0
    fp32_up: int = 0
    fp32_down: int = 0
    accepted: bool = True  # False: the server refused the UPDATE as late (the change goes into the next one)


@dataclass
class ClientResult:
    job_id: str
    rounds: list[RoundRecord] = field(default_factory=list)
    bye_reason: str = ""


def finite_metrics(values: dict[str, float]) -> dict[str, float]:
    """The values METRICS can carry: JSON has no NaN or infinity (a diverged loss would be sent as null, which the
    server refuses as a malformed header and closes the connection over). The round log keeps them all."""
    dropped = sorted(k for k, v in values.items() if not math.isfinite(v))
    if dropped:
        log.warning("not reporting non-finite metrics: %s", ", ".join(dropped))
    return {k: v for k, v in values.items() if math.isfinite(v)}


_ACC_KEYS = ("acc_exact", "acc_mc", "acc_cls", "acc_tf")


def accuracy_note(metrics: dict[str, float], what: str) -> str:
    """``", held-out acc_exact 41.0% (32 items), loss 1.234"`` for a log line; empty without figures."""
    parts = [f"{k} {100 * metrics[k]:.1f}%" for k in _ACC_KEYS if k in metrics]
    if "loss_eval" in metrics:
        parts.append(f"loss {metrics['loss_eval']:.4f}")
    if not parts:
        return ""
    n = f" ({int(metrics['eval_n'])} items)" if "eval_n" in metrics else ""
    return f", {what} {', '.join(parts)}{n}"


__all__ = ["ClientResult", "RoundRecord", "accuracy_note", "finite_metrics"]
