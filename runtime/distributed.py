"""Check that a model handed to ``runtime.apply`` is wrapped by DDP/FSDP the supported way.

A plan made for FSDP2 wrapped per block (``fsdp_wrap="blocks"``) is refused: its
module would need FSDP2's hooks between the blocks of its one graph. A plan's module must be compiled as one graph: the data-parallel wrapper goes
outside it (``DistributedDataParallel(runtime.apply(model, plan))`` or
``fully_shard(runtime.apply(model, plan))``). Wrappers inside it (a DDP module, or
``fully_shard`` on submodules) put communication hooks in the middle of the graph
that ``torch.compile(fullgraph=True)`` cannot trace.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_wrapping", "check_plan_wrap"]


def _wrapper_types() -> tuple[tuple[type, str], ...]:
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return (
        (DistributedDataParallel, "DistributedDataParallel"),
        (FullyShardedDataParallel, "FSDP (FullyShardedDataParallel)"),
        (FSDPModule, "fully_shard (FSDP2)"),
    )


def check_wrapping(model: nn.Module, plan=None) -> None:
    """Raise ``TypeError`` naming the module when ``model`` is DDP/FSDP-wrapped in a way the
    runtime cannot compile as one graph. ``fully_shard(model)`` on ``model`` itself is allowed.
    With ``plan``: first :func:`check_plan_wrap`."""
    if plan is not None:
        check_plan_wrap(plan)
    kinds = _wrapper_types()
    for name, mod in model.named_modules():
        for cls, what in kinds:
            if not isinstance(mod, cls):
                continue
            if name == "" and cls.__name__ == "FSDPModule":
                continue  # one FSDP2 group around the whole model: its hooks run outside the graph
            where = "the model itself" if name == "" else f"submodule {name!r}"
            raise TypeError(
                f"{where} is wrapped by {what}, which the planned graph cannot contain; wrap the planned "
                "module instead: DistributedDataParallel(runtime.apply(model, plan)) or "
                "fully_shard(runtime.apply(model, plan)) (one FSDP2 group; see README, torch.distributed)"
            )


def check_plan_wrap(plan) -> None:
    """Raise ``ValueError`` for a plan made with ``fsdp_wrap="blocks"``, which the runtime cannot run."""
    d = plan.distributed
    if d is None or d.fsdp_wrap != "blocks":
        return
    raise ValueError(
        f"this plan was made for FSDP2 wrapped per block (fsdp_wrap='blocks', fully_shard on {len(d.fsdp_blocks)} "
        "blocks and the model), which runtime.apply cannot run: the planned module is one compiled graph, and "
        "FSDP2's hooks between the blocks would break it. Plan with fsdp_wrap='model' to run the plan under "
        "fully_shard(runtime.apply(model, plan)), or use this plan for sizing (its per-rank peak, budget and batch)"
    )
