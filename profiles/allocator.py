"""How a device's allocator counts bytes: which device a graph runs on, the block
size it rounds to, and the share of a budget a recomputing plan leaves unused.

The planner (simulation, solvers, budgets) and the runtime (re-simulating new
shapes) both ask these questions; this module is the one place that answers them.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

__all__ = [
    "SAFETY",
    "CUDA_BLOCK_BYTES",
    "graph_device",
    "graph_device_type",
    "granularity",
    "round_bytes",
    "margin",
    "usable_bytes",
    "budget_for",
]

#: Plans that recompute keep this fraction of the budget unused. On CPU the
#: simulator sees every tensor but not the few-byte scalars some ops allocate on
#: the side. On CUDA the caching allocator counts whole blocks (a reused block is
#: only split when enough remains), which measured 3.8-5.0% above the simulated
#: peak on an H200 (bench/results/gpu_check_h200.json).
SAFETY = {"cpu": 0.001, "cuda": 0.06}

#: The CUDA caching allocator rounds every block up to a multiple of this.
CUDA_BLOCK_BYTES = 512


def graph_device(gm: fx.GraphModule) -> torch.device:
    """Device of the first tensor placeholder of a captured graph (CPU when none)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def graph_device_type(gm: fx.GraphModule) -> str:
    """``graph_device(gm).type``: ``"cpu"``, ``"cuda"``, ``"meta"``, ..."""
    return graph_device(gm).type


def granularity(device_type: str) -> int:
    """Bytes the allocator of ``device_type`` rounds each block up to (1: exact)."""
    return CUDA_BLOCK_BYTES if device_type == "cuda" else 1


def round_bytes(nbytes: int, granularity: int) -> int:
    """``nbytes`` rounded up to a whole number of ``granularity``-byte blocks."""
    if granularity <= 1:
        return nbytes
    return (nbytes + granularity - 1) // granularity * granularity


def margin(device_type: str) -> float:
    """The fraction of a budget a recomputing plan leaves unused on ``device_type``
    (any device but the CPU is treated as CUDA)."""
    return SAFETY.get(device_type, SAFETY["cuda"])


def usable_bytes(budget_bytes: int, device_type: str = "cpu", extra: float = 0.0) -> int:
    """Bytes a recomputing plan may use of ``budget_bytes``; ``extra``: a further
    fraction of it left unused (an executor's margin)."""
    return int(math.floor(budget_bytes * (1 - margin(device_type) - extra)))


def budget_for(peak_bytes: int, device_type: str = "cpu", extra: float = 0.0) -> int:
    """The smallest budget whose usable part (with ``extra``, as :func:`usable_bytes`) holds ``peak_bytes``."""
    return int(math.ceil(peak_bytes / (1 - margin(device_type) - extra))) + 1
