"""The per-block FSDP2 case of the distributed tests: the planner's accounting of ``fsdp_wrap="blocks"``.

``tests/test_distributed.py`` runs it inside the FSDP2 ranks it already spawns. A
3-layer GPT-2 (random init, loss inside the model) is planned per rank with
``world_size=2, sharding="fsdp", fsdp_wrap="blocks"`` and AdamW state, at a budget
that needs no recomputation: the plan's prediction is the no-recompute per-rank
peak. Each rank wraps the eager model as the plan records (``fully_shard`` on each
of ``Plan.distributed.fsdp_blocks``, then on the model: ``runtime.fully_shard_blocks``)
and trains two steps with AdamW in between; the second, measured from torch.profiler
allocator events, peaks within 5% of the prediction (measured: 76 bytes above it, on
8.0 MB). Then the same prepared step is planned at 60% of the higher rank's measured
peak: a plan that recomputes, whose simulated per-rank peak is within the budget
(``runtime.apply`` refuses such a plan, so it is not run).
"""

from __future__ import annotations

import copy
import gc

import torch

import planner
import runtime
from dist_harness import WORLD, _ReduceScatterFreedHere, train
from profiles import storage_bytes
from profiles.memory import allocator_peak

__all__ = ["prepare", "on_rank", "check"]

REGION = "fsdp_blocks_step"


def _gpt2():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=256, n_positions=64, use_cache=False,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).train()


def _inputs(rank: int) -> dict:
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1 + rank))
    return {"input_ids": ids, "labels": ids}


def prepare() -> tuple[planner.PreparedStep, planner.Plan]:
    """The GPT-2's step prepared per rank for per-block FSDP2, and its plan without recomputation."""
    step = planner.prepare(_gpt2(), _inputs(0), world_size=WORLD, sharding="fsdp", optimizer="adamw", fsdp_wrap="blocks")
    p = step.plan(1 << 30)
    assert not p.recomputed and p.distributed.fsdp_blocks == ("transformer.h.0", "transformer.h.1", "transformer.h.2")
    return step, p


def on_rank(rank: int, plan_json: str) -> dict:
    """On one rank: the eager GPT-2 wrapped per block as the plan records, two steps; the
    absolute peak of the second and the frees the profiler missed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.profiler import ProfilerActivity, profile

    plan = planner.Plan.from_json(plan_json)
    base, inputs = _gpt2(), _inputs(rank)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = copy.deepcopy(base)
        runtime.fully_shard_blocks(model, plan, mesh=init_device_mesh("cpu", (WORLD,)))
        groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for g in groups:
            g.set_custom_reduce_scatter(_ReduceScatterFreedHere())  # the frees on this thread (tests/dist_harness.py)
        train(model, model, inputs, measure=REGION)
        del model, g, groups
        gc.collect()
    peak, missed = allocator_peak(prof, region=REGION)
    return {"measured": storage_bytes(inputs.values()) + peak, "missed_frees": missed}


def check(results: list[dict], step: planner.PreparedStep, p: planner.Plan) -> None:
    """Every rank's peak within 5% of the plan's; the plan at 60% of the higher one fits."""
    for rank, r in enumerate(results):
        assert r["missed_frees"] == 0, (rank, r)
        assert abs(r["measured"] - p.predicted_peak_bytes) <= 0.05 * r["measured"], (rank, r, p.predicted_peak_bytes)
    budget = int(0.6 * max(r["measured"] for r in results))
    low = step.plan(budget)
    assert low.recomputed and low.predicted_peak_bytes <= low.budget_bytes == budget, (low.predicted_peak_bytes, budget)
    assert low.distributed.fsdp_wrap == "blocks"
