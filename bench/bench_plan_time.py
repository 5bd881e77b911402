"""Wall time of ``planner.plan()`` and of its solving part, per model and budget.

The models are ``bench_eager_gap.py``'s (random-init, 2 layers, hidden 128, batch
4 x 64, the loss inside via ``labels``). For each: ``planner.plan()`` end to end
(capture, profile, solve) at each budget, then ``plan_profile`` alone on one
captured and profiled graph (the solvers and their exact simulations). Budgets are
fractions of the no-checkpoint step's peak as the partition emits it (the same
bytes on every version of the planner). Each time is the least of ``--repeat``
runs, wall clock and this process's CPU time (less sensitive to other jobs on a
shared machine). Run it on two trees to compare them:

    PYTHONPATH=$PWD python bench/bench_plan_time.py [--models gpt2,mistral] [--fractions 1.0,0.7,0.5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import planner  # noqa: E402
from bench_eager_gap import make  # noqa: E402
from planner.api import plan_profile  # noqa: E402
from planner.problem import build_problem  # noqa: E402
from profiles import capture, profile_graph  # noqa: E402

GiB = 2**30


def split_peak(gp) -> int:
    """The no-checkpoint peak of the graphs as the partition emits them."""
    prob = build_problem(gp)
    if hasattr(prob, "unarranged"):
        prob = prob.unarranged()
    return prob.evaluate(frozenset()).sim.peak_bytes


def _outcome(make_plan) -> dict:
    """What a plan recomputes and predicts, or the minimum budget when the budget is below it."""
    try:
        p = make_plan()
    except planner.BudgetTooSmall as e:
        return {"too_small": True, "min_budget": e.min_budget_bytes}
    return {"recomputed": len(p.recomputed), "predicted": p.predicted_peak_bytes, "solver": p.solver.name}


def run(name: str, fractions: list[float], repeat: int) -> list[dict]:
    model, inputs = make(name)
    joint = capture(model, inputs, dropout="mask")
    gp = profile_graph(joint)
    peak = split_peak(gp)
    rows = []
    for f in fractions:
        budget = int(peak * f)
        solve, solve_cpu, total, total_cpu, got = [], [], [], [], {}
        for _ in range(repeat):
            t, c = time.perf_counter(), time.process_time()
            got = _outcome(lambda: plan_profile(gp, budget))
            solve.append(time.perf_counter() - t)
            solve_cpu.append(time.process_time() - c)
            torch._dynamo.reset()
            t, c = time.perf_counter(), time.process_time()
            _outcome(lambda: planner.plan(model, budget / GiB, inputs))
            total.append(time.perf_counter() - t)
            total_cpu.append(time.process_time() - c)
        rows.append({"model": name, "fraction": f, "budget": budget, "plan_profile_s": min(solve),
                     "plan_profile_cpu_s": min(solve_cpu), "plan_s": min(total), "plan_cpu_s": min(total_cpu), **got})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,mistral")
    ap.add_argument("--fractions", default="1.0,0.7,0.5")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for name in args.models.split(",") for r in run(name, [float(x) for x in args.fractions.split(",")], args.repeat)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
