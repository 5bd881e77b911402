"""Inductor-compiled plans under torch.distributed: DDP and FSDP2, 2 gloo processes on loopback.

A three-layer ReLU MLP is planned for Inductor per rank (``executor="inductor"``,
``world_size=2``, each engine's sharding, AdamW state included) near the least
budget the planner reaches, so the plan recomputes a matmul and its ReLU. One spawn
of 2 ranks trains it under DDP, then under FSDP2 (one ``fully_shard`` group), each
time wrapped around ``runtime.apply(model, plan, compile="inductor")`` exactly as the
op-by-op plan is wrapped (FSDP2 also the other way round: ``fully_shard(model)``, then
the plan applied to it). The reference is the same engine around the eager model
(no dropout, so eager is exact up to Inductor's own rounding): gradients at two
steps (the second after an AdamW step) within the tolerance ``test_inductor.py``
allows Inductor against eager. Inductor compiled the plan's split (backward's saved
inputs are none of the recomputed values), and each rank's second step, measured
from torch.profiler allocator events, peaks within the budget and within 5% of the
plan's prediction (measured: 12 bytes below it under DDP, 8 KB below under FSDP2).
Inductor compiles each plan's split once, in this process, before the ranks start
(the ranks still partition the graph and compile it, from Inductor's caches: a cold
compile in both ranks at once costs twice the CPU).
"""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planner
import runtime
from helpers import run_step
from profiles import storage_bytes
from profiles.memory import allocator_peak
from runtime.inductor import plans_key

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)

from dist_harness import WORLD, assert_same_grads, init, spawn, train, wrap  # noqa: E402

ENGINES = ("ddp", "fsdp")
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # Inductor against eager, as in test_inductor.py


class _MLP(nn.Module):
    """Three ReLU layers and an MSE loss: a few Inductor kernels, activations most of the peak."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 128, bias=False), nn.Linear(128, 128, bias=False),
                                     nn.Linear(128, 128, bias=False)])
        self.out = nn.Linear(128, 16, bias=False)

    def forward(self, x, target):
        for layer in self.layers:
            x = F.relu(layer(x))
        return {"loss": F.mse_loss(self.out(x), target)}


def _model():
    torch.manual_seed(0)
    return _MLP().train()


def _inputs(rank: int):
    g = torch.Generator().manual_seed(1 + rank)
    return {"x": torch.randn(1024, 16, generator=g), "target": torch.randn(1024, 16, generator=g)}


def _saved(planned) -> set[str]:
    """What the backward graph Inductor compiled takes from forward."""
    (_, bwd), = planned.compiled_graphs
    return {n.name for n in bwd.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")}


def _worker(rank: int, port: int, plans: dict, out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    init(rank, port)
    try:
        result = {}
        for sharding, plan_json in plans.items():
            plan = planner.Plan.from_json(plan_json)
            base, inputs = _model(), _inputs(rank)
            ref_model = copy.deepcopy(base)
            ref = train(wrap(ref_model, sharding), ref_model, inputs)
            # everything the planned rank holds is allocated inside the profiled session
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model = copy.deepcopy(base)
                planned = runtime.apply(model, plan, compile="inductor")
                got = train(wrap(planned, sharding), model, inputs, measure=sharding)
                saved = _saved(planned)
                del model, planned
                gc.collect()
            for step in (0, 1):
                assert_same_grads(ref[step], got[step], f"{sharding}, rank {rank}, step {step + 1}", **TOLERANCE)
            if sharding == "fsdp":  # fully_shard on the model first, the plan compiled around it, also works
                inner_model = copy.deepcopy(base)
                wrap(inner_model, sharding)
                inner = train(runtime.apply(inner_model, plan, compile="inductor"), inner_model, inputs)
                for step in (0, 1):
                    assert_same_grads(ref[step], inner[step], f"fully_shard(model) then apply, rank {rank}, step {step + 1}",
                                      **TOLERANCE)
            peak, missed = allocator_peak(prof, region=sharding)
            result[sharding] = {"measured": storage_bytes(inputs.values()) + peak, "missed_frees": missed,
                                "saved": sorted(saved)}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _plan(sharding: str) -> planner.Plan:
    """The MLP planned for Inductor per rank under ``sharding``, 2% above the least budget the planner reaches."""
    with planner.prepare(_model(), _inputs(0), world_size=WORLD, sharding=sharding, optimizer="adamw",
                         executor="inductor") as step:
        with pytest.raises(planner.BudgetTooSmall) as low:
            step.plan(1)
        return step.plan(int(1.02 * low.value.min_budget_bytes))


def test_inductor_plan_trains_under_ddp_and_fsdp2_within_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")  # the ranks read Inductor's caches: no pool of compile workers
    plans = {sharding: _plan(sharding) for sharding in ENGINES}
    for sharding, p in plans.items():
        assert p.executor == "inductor" and p.recomputed, sharding
        assert p.distributed.sharding == sharding and p.predicted_peak_bytes <= p.budget_bytes
    for p in {plans_key([p]): p for p in plans.values()}.values():  # each split once (both engines': one)
        run_step(runtime.apply(_model(), p, compile="inductor"), _inputs(0))  # into the caches the ranks read
    spawn(_worker, {s: p.to_json() for s, p in plans.items()}, str(tmp_path))
    for rank in range(WORLD):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for sharding, p in plans.items():
            got = r[sharding]
            assert got["saved"] and not set(got["saved"]) & set(p.recomputed), (rank, sharding, got)
            assert got["measured"] <= p.budget_bytes, (rank, sharding, got, p.budget_bytes)
            assert abs(got["measured"] - p.predicted_peak_bytes) <= 0.05 * got["measured"], (rank, sharding, got, p.predicted_peak_bytes)
