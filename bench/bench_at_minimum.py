"""Whether a plan at the planner's reported minimum budget measures what it predicts.

For each model of ``bench/bench_eager_gap.py``'s ``make`` (``whisper`` and
``whisper_padded`` included): the minimum (``BudgetTooSmall.min_budget_bytes`` of
a plan at a tiny budget), the plan at exactly that budget, its predicted peak, and
the peak of one step of ``runtime.apply`` of it, measured as
``bench_eager_gap.measure`` does (CPU allocator events plus parameters, buffers
and inputs).

    python bench/bench_at_minimum.py [--models whisper,whisper_padded,...]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from bench_eager_gap import make, measure  # noqa: E402


def run(name: str) -> dict:
    model, inputs = make(name)
    try:
        planner.plan(copy.deepcopy(model), 1e-6, inputs)
        raise AssertionError(f"{name}: a plan fits in 1 KiB")
    except planner.BudgetTooSmall as e:
        minimum = e.min_budget_bytes
    p = planner.plan(copy.deepcopy(model), minimum / planner.GiB, inputs)
    measured = measure(model, runtime.apply(model, p), inputs)
    return {"model": name, "minimum": minimum, "predicted": p.predicted_peak_bytes, "measured": measured,
            "recomputed": len(p.recomputed)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="whisper,whisper_padded")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | minimum | predicted | measured | measured - predicted | recomputed |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = run(name)
        print(f"| {r['model']} | {r['minimum']:,} | {r['predicted']:,} | {r['measured']:,} | "
              f"{r['measured'] - r['predicted']:+,} | {r['recomputed']} |", flush=True)


if __name__ == "__main__":
    main()
