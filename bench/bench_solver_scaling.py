"""How the planner's solve time grows with the graph: GPT-2 (d=256) of 2 to 24 layers.

For each depth, in one run on this machine: capture and profile one training step,
measure eager's peak, and plan with the ILP at a fraction (default 40%) of it.
Reports joint-graph nodes, ILP binaries, wall seconds of capture, profile and solve
(``plan_profile``: sqrt(L) start, ILP search, exact simulations; when the budget
is below what keeping dropout masks allows, again with RNG replay, as ``plan()`` does), the ILP's status,
calls and gap, and the recompute FLOPs. For the deepest model the plan is applied and
one step is run: measured peak against the budget, gradients against eager's.

    python bench/bench_solver_scaling.py [--layers 2,6,12,24] [--fraction 0.4] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from planner.api import plan_profile  # noqa: E402
from planner.problem import build_problem  # noqa: E402
from profiles import capture, profile_graph  # noqa: E402
from profiles.capture import with_dropout  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "examples"))
from plan_gpt2 import build, peak_of, step  # noqa: E402  (the same GPT-2 as the Quick start's example)

MiB = 2**20


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run(layers: int, fraction: float, apply: bool) -> dict:
    model, batch = build(layers)
    eager_peak = peak_of(model, model, batch)
    budget = int(fraction * eager_peak)
    t0 = time.perf_counter()
    joint = capture(model, batch)
    t1 = time.perf_counter()
    gp = profile_graph(joint)
    t2 = time.perf_counter()
    prob = build_problem(gp)
    binaries = len(prob.can_recompute) + len(prob.memory.candidates)
    info = planner.ModelInfo(fingerprint=joint.fingerprint, class_name=type(model).__name__)
    try:
        p = plan_profile(gp, budget, model_info=info)
    except planner.BudgetTooSmall:  # as plan() does: regenerate dropout masks instead of keeping them
        gp = profile_graph(with_dropout(joint, "replay"))
        p = plan_profile(gp, budget, model_info=info)
    t3 = time.perf_counter()
    row = {
        "layers": layers,
        "nodes": len(joint.gm.graph.nodes),
        "binaries": binaries,
        "eager_mib": eager_peak / MiB,
        "budget_mib": budget / MiB,
        "predicted_mib": p.predicted_peak_bytes / MiB,
        "capture_s": t1 - t0,
        "profile_s": t2 - t1,
        "solve_s": t3 - t2,
        "solver": p.solver.name,
        "dropout": p.dropout,
        "status": p.solver.status,
        "calls": p.solver.calls,
        "gap": p.solver.gap,
        "recompute": p.recompute_flops / p.total_flops,
    }
    joint.drop_tensors()
    del joint, gp, prob
    if apply:
        ref = copy.deepcopy(model)
        step(ref, batch)
        want = grads_of(ref)
        del ref
        for q in model.parameters():
            q.grad = None
        wrapped = runtime.apply(model, p)
        step(wrapped, batch)  # compiles
        row["measured_mib"] = peak_of(wrapped, model, batch) / MiB
        for q in model.parameters():
            q.grad = None
        step(wrapped, batch)
        got = grads_of(model)
        row["grads_equal"] = want.keys() == got.keys() and all(
            torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want
        )
    print(f"[bench] {row}", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict], fraction: float) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores ({cpu}), "
        f"torch {torch.__version__}, budget {fraction:.0%} of eager's measured peak, `solver=\"auto\"`.",
        "",
        "| layers | joint nodes | ILP binaries | eager peak (MiB) | budget | predicted | capture (s) | profile (s) | plan_profile (s) | dropout | solver, status | solver calls | gap | recompute FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "-" if r["gap"] is None else f"{r['gap']:.1e}"
        lines.append(
            f"| {r['layers']} | {r['nodes']} | {r['binaries']} | {r['eager_mib']:.1f} | {r['budget_mib']:.1f} | {r['predicted_mib']:.1f} | "
            f"{r['capture_s']:.1f} | {r['profile_s']:.1f} | {r['solve_s']:.1f} | {r['dropout']} | {r['solver']}, {r['status']} | {r['calls']} | {gap} | +{r['recompute']:.1%} |"
        )
    for r in rows:
        if "measured_mib" in r:
            lines += [
                "",
                f"Applied at {r['layers']} layers: measured peak {r['measured_mib']:.1f} MiB against a budget of "
                f"{r['budget_mib']:.1f} MiB (predicted {r['predicted_mib']:.1f}); gradients equal eager's "
                f"(rtol 1e-5, atol 1e-6): {'yes' if r['grads_equal'] else 'NO'}.",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,6,12,24", help="comma-separated depths")
    ap.add_argument("--fraction", type=float, default=0.4, help="budget as a fraction of eager's measured peak")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args()
    depths = [int(x) for x in args.layers.split(",")]
    rows = [run(n, args.fraction, apply=(n == max(depths))) for n in depths]
    text = table(rows, args.fraction)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
