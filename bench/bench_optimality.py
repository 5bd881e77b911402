"""How far from optimal are the solvers? Exhaustive search on small graphs.

For a model small enough (at most ~18 recomputable values), every subset of
values to recompute is simulated exactly (``Problem.evaluate``, the simulator
that checks every plan); the cheapest subset whose peak fits a budget is the true
optimum over the planner's decision space. The ILP (``solver="ilp"``), sqrt(L)
and ``auto`` plans are compared with it at budgets from the lowest reachable peak
to the no-recompute peak, under the default objective (estimated recompute time).

    python bench/bench_optimality.py [--model residual|gated] [--blocks 2] [--points 8]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
from torch import nn

import planner
from planner.api import plan_profile
from planner.problem import build_problem
from profiles import capture, profile_graph
from profiles.allocator import SAFETY


class Net(nn.Module):
    """Residual blocks ``x + relu(tanh(linear(x)))`` and a head; the loss inside."""

    def __init__(self, d: int = 64, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(blocks))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for layer in self.blocks:
            x = x + torch.tanh(layer(x)).relu()
        return self.head(x).square().mean()


class Gated(nn.Module):
    """Pre-norm gated blocks ``x + gelu(a(ln(x))) * sigmoid(b(ln(x)))``, dropout on
    the gate (its output is never recomputed), and a head; the loss inside."""

    def __init__(self, d: int = 64, blocks: int = 1):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.a = nn.ModuleList(nn.Linear(d, d) for _ in range(blocks))
        self.b = nn.ModuleList(nn.Linear(d, d) for _ in range(blocks))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for norm, a, b in zip(self.norms, self.a, self.b):
            h = norm(x)
            x = x + self.drop(nn.functional.gelu(a(h)) * torch.sigmoid(b(h)))
        return self.head(x).square().mean()


MODELS = {"residual": Net, "gated": Gated}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="residual")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--points", type=int, default=8, help="budgets between the lowest peak and the no-recompute peak")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, x = MODELS[args.model](blocks=args.blocks).train(), torch.randn(256, 64)
    gp = profile_graph(capture(model, (x,)))
    prob = build_problem(gp)
    cands = sorted(prob.can_recompute)
    if len(cands) > 20:
        print(f"{len(cands)} recomputable values: 2^{len(cands)} subsets is too many; use fewer --blocks")
        return 2
    t0 = time.perf_counter()
    evs = [prob.evaluate(frozenset(sub)) for r in range(len(cands) + 1) for sub in itertools.combinations(cands, r)]
    enum_s = time.perf_counter() - t0
    margin = SAFETY["cpu"]
    base = prob.evaluate(frozenset()).sim.peak_bytes
    low = min(e.sim.peak_bytes for e in evs)
    print(f"{args.model}, {args.blocks} blocks, d=64, batch 256: {len(gp.gm.graph.nodes)} joint nodes, {len(cands)} recomputable values, "
          f"{len(evs)} subsets simulated in {enum_s:.0f} s; no-recompute peak {base} B, lowest peak {low} B")
    print("| budget (B) | optimum (us) | ilp (us) | ilp / optimum | sqrt (us) | auto (us) | ilp solve (s) |")
    print("|---|---|---|---|---|---|---|")
    lo = int(low / (1 - margin)) + 2
    for i in range(args.points):
        budget = lo + (base - 1 - lo) * i // max(args.points - 1, 1)
        usable = budget * (1 - margin)
        fits = [e for e in evs if e.sim.peak_bytes <= usable]
        best = min(fits, key=lambda e: (e.cost_s, e.flops)) if fits else None
        row = [f"{budget}", f"{best.cost_s * 1e6:.2f}" if best else "none"]
        for solver in ("ilp", "sqrt", "auto"):
            try:
                p = plan_profile(gp, budget, solver=solver)
                row.append(f"{p.recompute_time_s * 1e6:.2f}")
                if solver == "ilp":
                    ratio = p.recompute_time_s / best.cost_s if best and best.cost_s else 1.0
                    row.append(f"{ratio:.3f}")
                    secs = f"{p.solver.seconds:.2f}"
            except planner.BudgetTooSmall:
                row.append("none")
                if solver == "ilp":
                    row.append("--")
                    secs = "--"
        row.append(secs)
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
