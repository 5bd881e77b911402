"""Per-rank peaks of planned modules inside DeepSpeed engines: predicted against measured, by ZeRO stage and precision.

A model (the DeepSpeed tutorial's SimpleModel, or a small random-init Hugging
Face GPT-2) trains on 2 gloo processes on loopback under ``deepspeed.initialize``
for two accumulation windows, as ``tests/test_deepspeed.py`` does: each rank runs
the engine without a plan (the reference) and around ``runtime.apply(model, plan)``,
compares losses and final weights, and measures the planned engine's second window
(forwards and backwards) and its optimizer step from ``torch.profiler`` allocator
events. The plan's budget per rank is halfway from the lowest peak the planner can
reach to the no-checkpoint peak, both with the engine's bytes.

    python bench/bench_deepspeed.py [--model gpt2|simple] [--stages 0,1,2] [--precisions fp32,bf16] [--accumulation 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the measurement harness shared with the tests
sys.path.insert(0, str(ROOT / "examples" / "deepspeed_tutorial"))

import planner  # noqa: E402
import runtime  # noqa: E402
from deepspeed_harness import WORLD, ds_init, train  # noqa: E402
from dist_harness import free_port  # noqa: E402


def build(name: str, precision: str):
    torch.manual_seed(0)
    if name == "simple":
        from simple_model import SimpleModel

        model = SimpleModel().train()
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=128)
        model = transformers.GPT2LMHeadModel(cfg).train()
    return model.to(torch.bfloat16) if precision == "bf16" else model


def batches(name: str, precision: str, rank: int, n: int) -> list[dict]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if name == "simple":
        from simple_model import batch

        return [batch(seed=100 * rank + i, dtype=dtype) for i in range(n)]
    g = torch.Generator().manual_seed(1 + rank)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 512, (2, 128), generator=g)
        out.append({"input_ids": ids, "labels": ids, "use_cache": False})
    return out


def config(stage: int, precision: str, accumulation: int, bucket: int) -> dict:
    c = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
        "train_batch_size": 2 * accumulation * WORLD,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket},
    }
    if precision == "bf16":
        c["bf16"] = {"enabled": True}
    return c


def _worker(rank: int, port: int, name: str, cases: list, out_dir: str) -> None:
    ds_init(rank, port)
    try:
        results = []
        for precision, cfg, plan_json in cases:
            plan = planner.Plan.from_json(plan_json)
            base = build(name, precision)
            data = batches(name, precision, rank, 2 * cfg["gradient_accumulation_steps"])
            ref = train(lambda m: m, base, cfg, data)
            got = train(lambda m: runtime.apply(m, plan), base, cfg, data, measure=True)
            same = ref["losses"] == got["losses"] and all(torch.equal(ref["weights"][k], got["weights"][k])
                                                           for k in ref["weights"])
            close = all(torch.allclose(ref["weights"][k], got["weights"][k], rtol=1e-5, atol=1e-6) for k in ref["weights"])
            results.append({"peak": got["peak"], "step_peak": got["step_peak"], "equal": same, "close": close})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def _plan(name: str, precision: str, cfg: dict) -> planner.Plan:
    model, inputs = build(name, precision), batches(name, precision, 0, 1)[0]
    kw = {"deepspeed": cfg, "world_size": WORLD}
    eager = planner.plan(model, 64.0, inputs, **kw)
    try:
        planner.plan(model, 1e-6, inputs, **kw)
    except planner.BudgetTooSmall as e:
        low = e.min_budget_bytes
    budget = (low + eager.baseline_peak_bytes) / 2
    return planner.plan(model, budget / planner.GiB, inputs, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["gpt2", "simple"], default="gpt2")
    ap.add_argument("--stages", default="0,1,2")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--bucket", type=int, default=2_000_000, help="reduce_bucket_size (elements)")
    args = ap.parse_args(argv)
    cases, plans = [], []
    for precision in args.precisions.split(","):
        for stage in map(int, args.stages.split(",")):
            cfg = config(stage, precision, args.accumulation, args.bucket)
            try:
                p = _plan(args.model, precision, cfg)
            except ValueError as e:  # a combination the planner refuses
                print(f"ZeRO {stage} {precision}: refused: {e}", flush=True)
                continue
            cases.append((precision, cfg, p.to_json()))
            plans.append((stage, precision, p))
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_worker, args=(free_port(), args.model, cases, out), nprocs=WORLD, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]
    MB = 1e6
    print(f"{args.model}, {WORLD} gloo ranks, micro-batch 2 x {args.accumulation} accumulated, AdamW, "
          f"reduce_bucket_size {args.bucket}")
    print("| ZeRO | precision | budget/rank | predicted/rank | measured rank 0, 1 (minus predicted) | optimizer step, measured | "
          "recompute (est.) | losses, weights |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (stage, precision, p) in enumerate(plans):
        got = [r[i] for r in ranks]
        diffs = ", ".join(f"{g['peak'] / MB:.2f} ({g['peak'] - p.predicted_peak_bytes:+d} B)" for g in got)
        verdict = "equal" if all(g["equal"] for g in got) else ("close" if all(g["close"] for g in got) else "DIFFER")
        print(f"| {stage} | {precision} | {p.budget_bytes / MB:.2f} MB | {p.predicted_peak_bytes / MB:.2f} MB | {diffs} MB | "
              f"{max(g['step_peak'] for g in got) / MB:.2f} MB | {p.recompute_time_s * 1e3:.2f} ms ({len(p.recomputed)} values) "
              f"| {verdict} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
