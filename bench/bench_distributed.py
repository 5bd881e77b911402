"""Per-rank peaks of planned modules under DDP and FSDP2: predicted against measured.

A random-init Hugging Face GPT-2 (tied embedding, dropout on) trains on 2 gloo
processes on loopback with AdamW, as ``tests/test_distributed.py`` does for a small
MLP: each rank runs the engine without a plan (the reference) and around
``runtime.apply(model, plan)``, compares gradients at two steps, and measures its
second step from ``torch.profiler`` allocator events. The budget per rank is what
the engine holds plus a fraction of the single-process step's no-checkpoint peak.
Also shown: the plan the solver would make if the engine's larger phase were taken
off the whole step, instead of adding each phase's engine bytes to that phase.

    python bench/bench_distributed.py [--layers 2] [--fraction 0.6]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the measurement harness shared with the tests

import planner  # noqa: E402
import runtime  # noqa: E402
from dist_harness import WORLD, assert_same_grads, init, spawn, train, wrap  # noqa: E402
from planner.distributed import Distributed, engine_bytes  # noqa: E402
from profiles import storage_bytes  # noqa: E402
from profiles.memory import allocator_peak  # noqa: E402


def build(layers: int):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=128, n_head=4, vocab_size=512, n_positions=128,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).train()


def inputs_for(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 512, (4, 128), generator=g)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def _measured(prof, region: str, inputs) -> int:
    peak, _ = allocator_peak(prof, region=region)
    return storage_bytes([v for v in inputs.values() if isinstance(v, torch.Tensor)]) + peak


def _worker(rank: int, port: int, layers: int, plan_json: str, sharding: str, out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    init(rank, port)
    try:
        plan = planner.Plan.from_json(plan_json)
        base, inputs = build(layers), inputs_for(rank)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ref_model = copy.deepcopy(base)
            ref = train(wrap(ref_model, sharding), ref_model, inputs, measure="reference")
            del ref_model
            gc.collect()
        reference = _measured(prof, "reference", inputs)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model = copy.deepcopy(base)
            got = train(wrap(runtime.apply(model, plan), sharding), model, inputs, measure="planned")
            del model
            gc.collect()
        planned = _measured(prof, "planned", inputs)
        assert_same_grads(ref[0], got[0], f"rank {rank} step 1")
        assert_same_grads(ref[1], got[1], f"rank {rank} step 2")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"reference": reference, "planned": planned}))
    finally:
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.6, help="of the single-process no-checkpoint peak, on top of the engine")
    args = ap.parse_args(argv)
    model, inputs = build(args.layers), inputs_for(0)
    single = planner.plan(model, 1.0, inputs).baseline_peak_bytes
    MB = 1e6
    print(f"GPT-2 {args.layers} layers, d=128, batch 4x128, AdamW, {WORLD} gloo processes; "
          f"single-process no-checkpoint peak {single / MB:.2f} MB")
    print("| engine | budget/rank | predicted/rank | measured rank 0, 1 (minus predicted) | eager under the engine, measured | "
          "recompute (est.) | with the larger phase off the whole step | gradients |")
    print("|---|---|---|---|---|---|---|---|")
    for sharding in ("ddp", "fsdp"):
        kw = {"world_size": WORLD, "sharding": sharding, "optimizer": "adamw"}
        engine = engine_bytes(model, Distributed(**kw))
        budget = engine.held + int(args.fraction * single)
        p = planner.plan(model, budget / planner.GiB, inputs, **kw)
        try:
            old = planner.plan(model, (budget - engine.held) / planner.GiB, inputs)
            before = f"{old.recompute_time_s * 1e3:.2f} ms"
        except planner.BudgetTooSmall:
            before = "no plan fits"
        with tempfile.TemporaryDirectory() as out:
            spawn(_worker, args.layers, p.to_json(), sharding, out)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]
        measured = [r["planned"] for r in ranks]
        assert max(measured) <= p.budget_bytes, (measured, p.budget_bytes)
        print(f"| {sharding} | {budget / MB:.2f} MB | {p.predicted_peak_bytes / MB:.2f} MB | "
              f"{measured[0] / MB:.2f}, {measured[1] / MB:.2f} MB ({measured[0] - p.predicted_peak_bytes:+d}, "
              f"{measured[1] - p.predicted_peak_bytes:+d} B) | {max(r['reference'] for r in ranks) / MB:.2f} MB | "
              f"{p.recompute_time_s * 1e3:.2f} ms "
              f"({len(p.recomputed)} values) | {before} | equal |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
