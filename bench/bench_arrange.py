"""How long ``plan()`` spends arranging steps for memory, on the Quick start's GPT-2.

Plans the GPT-2 of ``examples/plan_gpt2.py`` (d=256, 8 heads, vocab 1000, loss inside
via ``labels``) with ``planner.plan`` at a fraction of eager's measured peak, timing it
end to end and recording the schedules it arranges (:func:`planner.order.arrange`, as
:meth:`planner.problem.Problem.arranged` calls it). Then arranges each recorded
schedule again both ways, alternating, ``--repeats`` times: each candidate move's peak
from one simulation per round and the move's window (``incremental=True``, what
``plan()`` runs), and every moved schedule simulated in full (``incremental=False``);
and checks that both give the same orders, writes into inputs and peaks.

    python bench/bench_arrange.py [--layers 24] [--fraction 0.4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import planner  # noqa: E402
import planner.problem  # noqa: E402
from planner.order import arrange  # noqa: E402
from plan_gpt2 import build, peak_of  # noqa: E402


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def planned(layers: int, fraction: float) -> tuple[list, float, float, planner.Plan]:
    """The arrangements ``plan()`` makes (``(profile, schedule, keyword arguments)``),
    its wall and CPU seconds, and the plan."""
    model, batch = build(layers)
    budget_gb = fraction * peak_of(model, model, batch) / planner.GiB
    calls = []

    def recording(gp, schedule, **kw):
        calls.append((gp, schedule, kw))
        return arrange(gp, schedule, **kw)

    planner.problem.arrange = recording  # the name Problem.arranged calls; restored below
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        p = planner.plan(model, budget_gb, batch)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        planner.problem.arrange = arrange
    return calls, wall, cpu, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--fraction", type=float, default=0.4, help="budget as a fraction of eager's measured peak")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average {load()} at the start")
    calls, wall, cpu, p = planned(args.layers, args.fraction)
    print(f"plan(): {wall:.1f} s wall, {cpu:.1f} CPU s; {p.solver.name} ({p.solver.status}), dropout {p.dropout}, "
          f"{len(calls)} arrangements")
    best: dict[bool, list[float]] = {True: [1e9, 1e9], False: [1e9, 1e9]}
    same = True
    for _ in range(args.repeats):
        for incremental in (True, False):
            wall, cpu = time.perf_counter(), time.process_time()
            got = [arrange(gp, sched, incremental=incremental, **kw) for gp, sched, kw in calls]
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[incremental] = [min(best[incremental][0], wall), min(best[incremental][1], cpu)]
            results = [(a.schedule, a.reuse, a.before_bytes, a.after_bytes) for a in got]
            if incremental:
                first = results
            else:
                same = same and results == first
    for incremental, label in ((False, "every move simulated in full"), (True, "incremental")):
        w, c = best[incremental]
        print(f"arrangements, {label}: {w:.2f} s wall, {c:.2f} CPU s (best of {args.repeats})")
    print(f"same orders, writes and peaks both ways: {'yes' if same else 'NO'}; load average {load()} at the end")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
