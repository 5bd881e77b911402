"""Wrap a model in FSDP2 per block, as a plan made with ``fsdp_wrap="blocks"`` counts it.

``planner.plan(..., sharding="fsdp", fsdp_wrap="blocks")`` sizes a step with
``fully_shard`` on each repeated block (``Plan.distributed.fsdp_blocks``), then on the
model. ``runtime.apply`` cannot run such a plan (FSDP2's hooks would sit between the
blocks of its one compiled graph); :func:`fully_shard_blocks` wraps the unplanned
model the way the plan's per-rank peak assumes, to train it eagerly at that size.
"""

from __future__ import annotations

from torch import nn

from planner import Plan

__all__ = ["fully_shard_blocks"]


def fully_shard_blocks(model: nn.Module, plan: Plan, **fully_shard_kwargs) -> nn.Module:
    """``fully_shard`` on each of ``plan``'s blocks in forward order, then on ``model``
    (each call with ``fully_shard_kwargs``: ``mesh=``, ``mp_policy=``...); returns ``model``."""
    d = plan.distributed
    if d is None or d.fsdp_wrap != "blocks":
        raise ValueError(
            "this plan was not made with fsdp_wrap='blocks' (planner.plan(..., sharding='fsdp', fsdp_wrap='blocks')); "
            "a plan for one FSDP2 group runs as fully_shard(runtime.apply(model, plan))"
        )
    from torch.distributed.fsdp import fully_shard

    blocks = []
    for path in d.fsdp_blocks:
        try:
            blocks.append(model.get_submodule(path))
        except AttributeError as e:
            raise ValueError(f"the plan's block {path!r} is not a submodule of this {type(model).__name__}: "
                             "wrap the model the plan was made for") from e
    for block in blocks:
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
