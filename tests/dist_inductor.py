"""The Inductor case of the distributed tests: a plan compiled by Inductor under DDP and FSDP2.

``tests/test_distributed.py`` runs it inside the ranks it already spawns (one spawn
less). A three-layer ReLU MLP is planned for Inductor per rank (``executor="inductor"``,
``world_size=2``, each engine's sharding, AdamW state included) 2% above the least
budget the planner reaches, so the plan recomputes a matmul and its ReLU. Each rank
trains it under DDP, then under FSDP2 (one ``fully_shard`` group), each time wrapped
around ``runtime.apply(model, plan, compile="inductor")`` exactly as the op-by-op plan
is wrapped (FSDP2 also the other way round: ``fully_shard(model)``, then the plan
applied to it). The reference is the same engine around the eager model (no dropout,
so eager is exact up to Inductor's own rounding): gradients at two steps (the second
after an AdamW step) within the tolerance ``test_inductor.py`` allows Inductor against
eager. Inductor compiled the plan's split (backward's saved inputs are none of the
recomputed values), and each rank's second step, measured from torch.profiler
allocator events, peaks within the budget and within 5% of the plan's prediction
(measured: 12 bytes below it under DDP, 8 KB below under FSDP2).

Inductor compiles each plan's split once, in the test's process, before the ranks
start (:func:`plans`); the ranks still partition the graph and compile it, from
Inductor's caches (a cold compile in both ranks at once costs twice the CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planner
import runtime
from dist_harness import WORLD, assert_same_grads, train, train_against_eager, wrap
from helpers import run_step
from runtime.inductor import plans_key

__all__ = ["ENGINES", "plans", "on_rank", "check"]

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


def _plan(sharding: str) -> planner.Plan:
    with planner.prepare(_model(), _inputs(0), world_size=WORLD, sharding=sharding, optimizer="adamw",
                         executor="inductor") as step:
        with pytest.raises(planner.BudgetTooSmall) as low:
            step.plan(1)
        return step.plan(int(1.02 * low.value.min_budget_bytes))


def plans() -> dict[str, planner.Plan]:
    """The MLP's plan per engine, each recomputing; their splits compiled here once."""
    out = {sharding: _plan(sharding) for sharding in ENGINES}
    for sharding, p in out.items():
        assert p.executor == "inductor" and p.recomputed, sharding
        assert p.distributed.sharding == sharding and p.predicted_peak_bytes <= p.budget_bytes
    for p in {plans_key([p]): p for p in out.values()}.values():  # each split once (both engines': one)
        run_step(runtime.apply(_model(), p, compile="inductor"), _inputs(0))  # into the caches the ranks read
    return out


def _saved(compiled_graphs: list) -> list[str]:
    """What the backward graph Inductor compiled takes from forward."""
    (_, bwd), = compiled_graphs
    return sorted(n.name for n in bwd.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents"))


def on_rank(rank: int, plan_jsons: dict[str, str]) -> dict:
    """On one rank: each engine's run against the eager reference (asserted here); per
    engine the absolute peak of the measured step and what backward was given."""
    result = {}
    for sharding, plan_json in plan_jsons.items():
        plan = planner.Plan.from_json(plan_json)
        base, inputs = _model(), _inputs(rank)
        run = train_against_eager(base, inputs, sharding, lambda m: runtime.apply(m, plan, compile="inductor"),
                                  f"Inductor, rank {rank}", region=f"inductor_{sharding}", **TOLERANCE)
        if sharding == "fsdp":  # fully_shard on the model first, the plan compiled around it, also works
            inner_model = copy.deepcopy(base)
            wrap(inner_model, sharding)
            inner = train(runtime.apply(inner_model, plan, compile="inductor"), inner_model, inputs)
            for step in (0, 1):
                assert_same_grads(run.reference[step], inner[step], f"Inductor, fully_shard(model) then apply, rank {rank}, "
                                  f"step {step + 1}", **TOLERANCE)
        result[sharding] = {"measured": run.measured, "saved": _saved(run.compiled_graphs)}
    return result


def check(rank: int, result: dict, plans_made: dict[str, planner.Plan]) -> None:
    """One rank's :func:`on_rank` result against the plans: the plan's split, and the peak."""
    assert result.keys() == plans_made.keys(), (rank, result)
    for sharding, p in plans_made.items():
        got = result[sharding]
        assert got["saved"] and not set(got["saved"]) & set(p.recomputed), (rank, sharding, got)
        assert got["measured"] <= p.budget_bytes, (rank, sharding, got, p.budget_bytes)
        assert abs(got["measured"] - p.predicted_peak_bytes) <= 0.05 * got["measured"], (rank, sharding, got, p.predicted_peak_bytes)
