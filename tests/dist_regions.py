"""The regions case of the distributed tests: a model that breaks the graph, planned per rank, under DDP.

``tests/test_distributed.py`` runs it inside the DDP ranks it already spawns. A
model of three small blocks with a ``print`` and a branch on a tensor between
them (three graph regions) is planned per rank (``world_size=2``, DDP, AdamW
state included) at 85% of its no-checkpoint peak, so the plan recomputes. Each
rank trains it under DDP against DDP around the eager model: gradients equal at
two steps (the second after an AdamW step), and the second step, measured from
torch.profiler allocator events, within the budget and within 5% of the plan's
prediction. (FSDP2 as one group around a region plan passed the same checks when
run by hand; it is left out to keep the suite's time.)
"""
from __future__ import annotations

import torch
from torch import nn

import planner
import runtime
from dist_harness import WORLD, train_against_eager

__all__ = ["ENGINES", "plans", "on_rank", "check"]

ENGINES = ("ddp",)  # DDP splits compiled graphs at its buckets unless told not to: the case to guard


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Breaky(nn.Module):
    """Three blocks; a print after the first, a branch on a tensor (always taken) after the second."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.b1, self.b2, self.b3 = _Block(d), _Block(d), _Block(d)
        self.head = nn.Linear(d, 1)

    def forward(self, x, target):
        h = self.b1(x)
        print("between blocks")
        h = self.b2(h)
        if h.abs().sum() > 0:
            h = h * 2
        return {"loss": nn.functional.mse_loss(self.head(self.b3(h)), target)}


def _model():
    torch.manual_seed(0)
    return _Breaky().train()


def _inputs(rank: int):
    g = torch.Generator().manual_seed(1 + rank)
    return {"x": torch.randn(256, 32, generator=g), "target": torch.randn(256, 1, generator=g)}


def _plan(sharding: str) -> planner.Plan:
    with planner.prepare(_model(), _inputs(0), world_size=WORLD, sharding=sharding, optimizer="adamw") as step:
        free = step.plan(2**40)
        return step.plan(int(0.85 * free.baseline_peak_bytes))


def plans() -> dict[str, planner.Plan]:
    """The model's plan per engine, each recomputing, as three regions."""
    out = {sharding: _plan(sharding) for sharding in ENGINES}
    for sharding, p in out.items():
        assert len(p.regions) == 3 and p.recomputed, sharding
        assert p.distributed.sharding == sharding and p.predicted_peak_bytes <= p.budget_bytes
    return out


def on_rank(rank: int, plan_jsons: dict[str, str]) -> dict:
    """On one rank: each engine's run against the eager reference (asserted here); per
    engine the absolute peak of the measured step."""
    result = {}
    for sharding, plan_json in plan_jsons.items():
        plan = planner.Plan.from_json(plan_json)
        run = train_against_eager(_model(), _inputs(rank), sharding, lambda m: runtime.apply(m, plan),
                                  f"regions, rank {rank}", region=f"regions_{sharding}")
        result[sharding] = run.measured
    return result


def check(rank: int, measured: dict, plans_made: dict[str, planner.Plan]) -> None:
    """One rank's :func:`on_rank` peaks against the plans."""
    assert measured.keys() == plans_made.keys(), (rank, measured)
    for sharding, p in plans_made.items():
        assert measured[sharding] <= p.budget_bytes, (rank, sharding, measured, p.budget_bytes)
        assert abs(measured[sharding] - p.predicted_peak_bytes) <= 0.05 * measured[sharding], (
            rank, sharding, measured, p.predicted_peak_bytes)
