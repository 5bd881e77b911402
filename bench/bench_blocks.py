"""The block ILP against the flat ILP and sqrt(L) on GPT-2 (d=256, 8 heads, vocab 1000,
batch 4x256, loss inside via ``labels``) of several depths.

For each depth: capture and profile one training step, then plan at a fraction
(default 40%) of the no-checkpoint step's simulated peak with the block ILP
(``solver="blocks"``: copies of each layer share decisions, :mod:`planner.block_ilp`),
the flat ILP (``solver="ilp"``, its own time limit) and sqrt(L) (``solver="sqrt"``),
each through ``plan_profile`` (sqrt(L) start, ILP search, exact simulation). Reports
joint-graph nodes, repeated blocks, binaries of both ILPs, seconds, and recompute
FLOPs over the step's FLOPs. Then, for the depth given by ``--end-to-end``,
``planner.plan()`` end to end with ``solver="auto"`` (capture, profile, both dropout
treatments), and where that depth's capture time goes (cProfile, cumulative seconds of its stages).

    python bench/bench_blocks.py [--layers 6,12,24] [--fraction 0.4] [--flat-limit 300] [--end-to-end 24] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import planner  # noqa: E402
from planner.api import plan_profile  # noqa: E402
from planner.block_ilp import block_layouts, BlockIlp  # noqa: E402
from planner.blocks import find_blocks  # noqa: E402
from planner.problem import build_problem  # noqa: E402
from profiles import capture, profile_graph  # noqa: E402
from profiles.capture import with_dropout  # noqa: E402

MiB = 2**20

#: Stages of ``capture()`` whose cumulative time is reported: (label, file suffix, function).
CAPTURE_STAGES = (
    ("dynamo trace + AOTAutograd (torch.compile of the step)", "profiles/capture.py", "_record_step"),
    ("  of which AOTAutograd's joint graph", "_aot_autograd/graph_capture.py", "aot_dispatch_autograd_graph"),
    ("graph fingerprint", "profiles/signature.py", "graph_fingerprint"),
    ("structure fingerprint", "profiles/signature.py", "structure_fingerprint"),
    ("node digests", "profiles/signature.py", "node_digests"),
    ("copy of the captured graph", "", "copy_graph_module"),
    ("prepare_joint (dropout rewrite, ...)", "profiles/capture.py", "prepare_joint"),
)


def build(layers: int):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=256, n_head=8, vocab_size=1000, n_positions=256)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, 1000, (4, 256))
    return model, {"input_ids": ids, "labels": ids, "use_cache": False}


def _plan(joint, gp, budget: int, solver: str, time_limit_s: float):
    """``plan_profile`` as ``plan()`` runs it: dropout masks kept, or replayed when they do not fit."""
    t0 = time.perf_counter()
    try:
        p = plan_profile(gp, budget, solver=solver, time_limit_s=time_limit_s)
    except planner.BudgetTooSmall:
        p = plan_profile(profile_graph(with_dropout(joint, "replay")), budget, solver=solver, time_limit_s=time_limit_s)
    return p, time.perf_counter() - t0


def run(layers: int, fraction: float, flat_limit: float, *, profile_capture: bool) -> dict:
    """One row; with ``profile_capture`` the capture runs under cProfile (its time includes the profiler's)."""
    model, batch = build(layers)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    if profile_capture:
        prof.enable()
    joint = capture(model, batch)
    prof.disable()
    t1 = time.perf_counter()
    gp = profile_graph(joint)
    t2 = time.perf_counter()
    prob = build_problem(gp)
    base = prob.evaluate(frozenset()).sim.peak_bytes
    budget = int(fraction * base)
    blocks = find_blocks(gp)
    layouts = block_layouts(prob, blocks)
    row = {
        "layers": layers, "nodes": len(joint.gm.graph.nodes), "capture_s": t1 - t0, "profile_s": t2 - t1,
        "kinds": len(layouts), "copies": sum(len(lay.blocks) for lay in layouts), "coverage": blocks.coverage,
        "flat_binaries": len(prob.can_recompute) + len(prob.memory.candidates),
        "block_binaries": BlockIlp(prob, layouts).num_variables if layouts else None,
        "base_mib": base / MiB, "budget_mib": budget / MiB,
    }
    for solver, limit in (("blocks", 60.0), ("ilp", flat_limit), ("sqrt", 60.0)):
        p, seconds = _plan(joint, gp, budget, solver, limit)
        row[solver] = {"seconds": seconds, "overhead": p.recompute_flops / p.total_flops, "time_s": p.recompute_time_s,
                       "name": p.solver.name, "status": p.solver.status, "calls": p.solver.calls,
                       "peak_mib": p.predicted_peak_bytes / MiB, "dropout": p.dropout}
    if profile_capture:
        stats = pstats.Stats(prof).stats
        row["stages"] = [(label, sum(v[3] for (file, _, name), v in stats.items() if name == func and file.endswith(path)))
                         for label, path, func in CAPTURE_STAGES]
    joint.drop_tensors()
    print(f"[bench] {row}", file=sys.stderr, flush=True)
    return row


def end_to_end(layers: int, fraction: float, base_mib: float) -> dict:
    """``planner.plan()`` with ``solver="auto"`` at ``fraction`` of ``base_mib`` (the no-checkpoint simulated peak)."""
    model, batch = build(layers)
    budget_gb = fraction * base_mib * MiB / planner.GiB
    t0 = time.perf_counter()
    p = planner.plan(model, budget_gb, batch)
    seconds = time.perf_counter() - t0
    out = {"layers": layers, "seconds": seconds, "solver": p.solver.name, "status": p.solver.status,
           "backend": p.solver.backend, "dropout": p.dropout, "overhead": p.recompute_flops / p.total_flops,
           "peak_mib": p.predicted_peak_bytes / MiB, "budget_mib": p.budget_bytes / MiB}
    print(f"[bench] {out}", file=sys.stderr, flush=True)
    return out


def table(rows: list[dict], e2e: dict | None, args) -> str:
    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores ({cpu}), "
        f"load average {load:.1f} at the end, torch {torch.__version__}; budget {args.fraction:.0%} of the no-checkpoint "
        f"step's simulated peak; flat ILP time limit {args.flat_limit:.0f} s.",
        "",
        "| layers | joint nodes | repeated blocks | binaries flat / blocks | capture (s) | profile (s) "
        "| blocks: plan (s), recompute | flat ILP: plan (s), recompute, solver | sqrt(L): recompute |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, f, s = r["blocks"], r["ilp"], r["sqrt"]
        lines.append(
            f"| {r['layers']} | {r['nodes']} | {r['kinds']} kind, {r['copies']} copies ({r['coverage']:.0%} of forward) "
            f"| {r['flat_binaries']} / {r['block_binaries']} | {r['capture_s']:.1f} | {r['profile_s']:.1f} "
            f"| {b['seconds']:.1f}, +{b['overhead']:.2%} | {f['seconds']:.1f}, +{f['overhead']:.2%}, {f['name']} "
            f"| +{s['overhead']:.2%} |"
        )
    lines += ["", "Recompute: recomputed FLOPs over the step's FLOPs (estimated recompute seconds in the log)."]
    if e2e is not None:
        lines += [
            "",
            f"`planner.plan()` end to end, {e2e['layers']} layers at {args.fraction:.0%} "
            f"({e2e['budget_mib']:.1f} MiB): {e2e['seconds']:.1f} s, {e2e['solver']} ({e2e['backend']}), "
            f"{e2e['status']}, dropout {e2e['dropout']}, predicted peak {e2e['peak_mib']:.1f} MiB, "
            f"recompute +{e2e['overhead']:.2%}.",
        ]
    for r in rows:
        if "stages" in r:
            lines += ["", f"Capture of {r['layers']} layers under cProfile, {r['capture_s']:.1f} s "
                          "(cumulative seconds, profiler overhead included):", ""]
            lines += [f"- {label}: {cum:.1f} s" for label, cum in r["stages"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="6,12,24", help="comma-separated depths")
    ap.add_argument("--fraction", type=float, default=0.4, help="budget as a fraction of the no-checkpoint simulated peak")
    ap.add_argument("--flat-limit", type=float, default=300.0, help="time limit of the flat ILP (s)")
    ap.add_argument("--end-to-end", type=int, default=24, help="depth for planner.plan() end to end (0: none)")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args()
    depths = [int(n) for n in args.layers.split(",") if n]
    rows = [run(n, args.fraction, args.flat_limit, profile_capture=n == args.end_to_end) for n in depths]
    base = {r["layers"]: r["base_mib"] for r in rows}
    e2e = None
    if args.end_to_end:
        if args.end_to_end not in base:
            ap.error("--end-to-end must be one of --layers (its no-checkpoint peak sets the budget)")
        e2e = end_to_end(args.end_to_end, args.fraction, base[args.end_to_end])
    text = table(rows, e2e, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
