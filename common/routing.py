"""Layerwise routing (FedMosaic-Adaptive): which blocks of an adapter a client sends this round.

A block is one adapted module: its ``lora_A`` and ``lora_B`` travel together (the product B·A is what the
module learns; half a pair would be averaged against the other half of another round). A tensor that is not
part of a LoRA pair (a learner's extra tensor) is a block of its own. Each round the client ranks its blocks by
the energy per value of what it has to send for them, ‖Δ + e‖² / values (this round's change plus what earlier
rounds left in the uplink residual), and sends whole blocks in that order while they fit in ``fraction`` of the
adapter's values (at least one block). Per value, not per block: blocks differ in size (a grouped-query
``v_proj`` is a third of a ``q_proj``), and ranking by total energy favoured the large ones, so half the blocks
carried 53 % of the values on the real-LM benchmark; a budget in values makes ``fraction`` what the uplink
costs. What is not sent stays in the residual and grows there, so a block that keeps changing is sent in a
later round: nothing is lost, only delayed (EF-SGD's argument, applied per block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .messages import JobTerms

_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_A", ".lora_B")


def block_of(name: str) -> str:
    """The block a tensor belongs to: its module path for a LoRA factor, else the tensor itself."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def blocks(names: Iterable[str]) -> dict[str, list[str]]:
    """Block -> its tensor names, both sorted."""
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        out.setdefault(block_of(name), []).append(name)
    return dict(sorted(out.items()))


def uplink_selection(job: JobTerms) -> Callable[[Mapping[str, np.ndarray]], set[str]] | None:
    """Which of its pending shared tensors a client of ``job`` sends each round (None: all of them): with
    ``uplink_routing`` the most changed blocks within that share of the values. (Tensors the job does not share
    at all, ``LoraJobSpec.shares``, never reach the uplink: FFA-LoRA's frozen A, FedSA-LoRA's local B.)"""
    fraction = job.uplink_routing
    return None if fraction is None else partial(route, fraction=fraction)


def route(pending: Mapping[str, np.ndarray], fraction: float) -> set[str]:
    """The tensor names of the blocks to send: by energy per value, highest first (ties by name, so the choice
    is deterministic), each taken if it still fits in ``fraction`` of all values; at least the first."""
    if not 0 < fraction <= 1:
        raise ValueError(f"routing fraction must be in (0, 1], got {fraction}")
    groups = blocks(pending)
    size = {b: sum(int(np.size(pending[n])) for n in names) for b, names in groups.items()}
    energy = {
        b: sum(float(np.square(pending[n], dtype=np.float64).sum()) for n in names) for b, names in groups.items()
    }
    order = sorted(groups, key=lambda b: (-energy[b] / max(size[b], 1), b))
    budget = fraction * sum(size.values())
    chosen, used = [order[0]], size[order[0]]
    for b in order[1:]:
        if used + size[b] <= budget:
            chosen.append(b)
            used += size[b]
    return {n for b in chosen for n in groups[b]}


__all__ = ["block_of", "blocks", "route"]
