"""Does ``solver="auto"`` ever do worse than sqrt(L)? Ten budgets per model.

For each model the step is captured once (``planner.prepare``). Its range of
budgets runs from the lowest the planner reaches (``BudgetTooSmall.min_budget_bytes``)
to the no-checkpoint step's predicted peak, and ``--points`` budgets are spread
evenly over it (both ends included). At each budget the same step is planned with
``solver="auto"``, ``"sqrt"`` and ``"ilp"`` (the flat ILP, with ``--ilp-limit``
seconds), exactly as ``planner.plan`` would. Two checks per budget:

- auto's estimated recompute time is at most sqrt(L)'s;
- when auto returns sqrt(L)'s plan, no ILP plan is 10% or more cheaper.

Costs are the plans' objective (estimated recompute seconds, ``Plan.recompute_time_s``)
and recomputed FLOPs over the step's. The models: the Quick start's GPT-2
(``examples/plan_gpt2.py``, d=256, batch 4x256) at ``--layers`` depths, and the
benchmark ResNet (``bench/bench_checkpointing.py``).

    python bench/bench_auto_vs_sqrt.py [--models gpt2-6,gpt2-24,resnet] [--points 10] [--ilp-limit 60] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import planner  # noqa: E402
import bench_checkpointing  # noqa: E402
from plan_gpt2 import build  # noqa: E402

MiB = 2**20
SOLVERS = ("auto", "sqrt", "ilp")


def model_of(name: str):
    """``(title, model, inputs)`` for ``gpt2-<layers>`` or ``resnet``."""
    if name.startswith("gpt2-"):
        layers = int(name.split("-", 1)[1])
        model, batch = build(layers)
        return f"GPT-2, {layers} layers", model, batch
    if name == "resnet":
        w = bench_checkpointing.make_resnet()
        return "the benchmark ResNet (bench/bench_checkpointing.py)", w.model, w.inputs
    raise SystemExit(f"unknown model {name!r}: use gpt2-<layers> or resnet")


def sweep_model(name: str, points: int, ilp_limit: float) -> dict:
    title, model, inputs = model_of(name)
    t0 = time.perf_counter()
    with planner.prepare(model, inputs, time_limit_s=ilp_limit) as step:
        capture_s = time.perf_counter() - t0
        top = step.plan(2**50).predicted_peak_bytes
        try:
            step.plan(1)
            raise AssertionError("a 1-byte budget was planned")
        except planner.BudgetTooSmall as e:
            low = e.min_budget_bytes
        budgets = [round(low + (top - low) * i / (points - 1)) for i in range(points)]
        rows = []
        for budget in budgets:
            row = {"budget": budget}
            for solver in SOLVERS:
                t = time.perf_counter()
                p = step.plan(budget, solver=solver)
                row[solver] = {
                    "seconds": time.perf_counter() - t,
                    "solver": p.solver.name,
                    "status": p.solver.status,
                    "time_s": p.recompute_time_s,
                    "flops": p.overhead,
                    "peak": p.predicted_peak_bytes,
                }
            auto, sq, ilp = row["auto"], row["sqrt"], row["ilp"]
            row["auto_not_costlier"] = auto["time_s"] <= sq["time_s"] * (1 + 1e-9)
            row["no_cheaper_ilp_missed"] = auto["solver"] != "sqrt" or ilp["time_s"] > 0.9 * sq["time_s"]
            rows.append(row)
            print(f"[bench] {name} {row}", file=sys.stderr, flush=True)
    return {"name": name, "title": title, "capture_s": capture_s, "low": low, "top": top, "rows": rows}


def _by(asked: str, solver: str) -> str:
    """A note when ``solver="sqrt"``/``"ilp"`` returned another solver's plan (none of its own fits)."""
    return "" if asked == "auto" or solver in (asked, "none") else f" [{solver}'s]"


def table(results: list[dict], ilp_limit: float) -> str:
    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()
    out = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores ({cpu}), "
        f"torch {torch.__version__}, load average {load[0]:.1f} at the end; flat ILP time limit {ilp_limit:g} s.",
        "",
    ]
    for r in results:
        out += [
            f"**{r['title']}**: budgets from {r['low'] / MiB:.1f} MiB (the minimum) to {r['top'] / MiB:.1f} MiB "
            f"(no recompute). Recompute: estimated seconds (FLOPs over the step's); [x's]: the column's solver found "
            "no plan of its own within the budget, and `plan()` returned x's (for sqrt(L): the lowest plan the ILP reaches).",
            "",
            "| budget (MiB) | auto | sqrt(L) | flat ILP | auto's solver | auto <= sqrt(L) | no ILP plan 10% cheaper than an auto=sqrt(L) plan |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            cells = [f"{row[s]['time_s']:.4f} ({row[s]['flops']:.1%})" + _by(s, row[s]['solver']) for s in SOLVERS]
            out.append(
                f"| {row['budget'] / MiB:.1f} | {' | '.join(cells)} | {row['auto']['solver']} | "
                f"{'yes' if row['auto_not_costlier'] else 'NO'} | {'yes' if row['no_cheaper_ilp_missed'] else 'NO'} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-6,gpt2-24,resnet")
    ap.add_argument("--points", type=int, default=10, help="budgets per model, both ends included")
    ap.add_argument("--ilp-limit", type=float, default=60.0, help="time limit of each ILP solve (plan's time_limit_s)")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args()
    results = [sweep_model(m, args.points, args.ilp_limit) for m in args.models.split(",")]
    text = table(results, args.ilp_limit)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
