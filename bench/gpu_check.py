"""GPU check: plan a GPT-2 on the GPU, apply, and compare predicted with measured.

Run on a machine with CUDA: ``python bench/gpu_check.py [--out results.json]``.
Measures eager's peak with ``torch.cuda.max_memory_allocated``, plans at 50% and
30% of it and at the planner's minimum (node times measured on the GPU), applies
each plan and records measured peak, predicted peak, step time (CUDA events,
median of 5 steps) against the profile's predicted time, and whether gradients
equal eager's.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

import planner
import runtime
from profiles import capture, profile_graph, storage_bytes


def build(device, layers=6):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=256, n_head=8, vocab_size=1000, n_positions=256)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(device).train()
    ids = torch.randint(0, 1000, (8, 256), device=device)
    return model, {"input_ids": ids, "labels": ids}


def step(module, batch, seed=0):
    torch.manual_seed(seed)
    out = module(**batch)
    out.loss.backward()
    return out.loss.detach()


def peak_and_time(module, model, batch, device, repeats=5):
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(module, batch)
    torch.cuda.synchronize(device)
    # this model's step: its parameters, buffers and inputs plus what the step
    # allocated above everything else on the device (other copies of the model)
    static = storage_bytes(list(model.parameters()) + list(model.buffers()) + list(batch.values()))
    peak = torch.cuda.max_memory_allocated(device) - before + static
    times = []
    for _ in range(repeats):
        for p in model.parameters():
            p.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(module, batch)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    for p in model.parameters():
        p.grad = None
    return peak, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    device = torch.device("cuda")
    model, batch = build(device, args.layers)
    rows = []
    eager_model = copy.deepcopy(model)
    step(eager_model, batch)  # warm-up (cuBLAS workspaces)
    eager_peak, eager_time = peak_and_time(eager_model, eager_model, batch, device)
    step(eager_model, batch)
    ref = {n: p.grad.clone() for n, p in eager_model.named_parameters()}
    rows.append({"config": "eager", "measured_peak": eager_peak, "step_s": eager_time})
    print(f"eager peak {eager_peak / 2**20:.1f} MiB, step {eager_time * 1e3:.2f} ms", flush=True)
    gp = profile_graph(capture(model, batch), measure_time=True)
    base_time = sum(n.time_s for n in gp.nodes.values() if n.phase in ("forward", "backward"))
    budgets = [("0.5", int(0.5 * eager_peak)), ("0.3", int(0.3 * eager_peak)), ("min", None)]
    for label, budget in budgets:
        t0 = time.perf_counter()
        try:
            if budget is None:
                raise planner.BudgetTooSmall(0, 0)
            plan = planner.plan(model, budget / planner.GiB, batch, measure_time=True)
        except planner.BudgetTooSmall as e:
            if budget is not None:
                print(f"{label}: {e}", flush=True)
            try:
                planner.plan(model, 1e-6, batch, measure_time=True)
            except planner.BudgetTooSmall as e2:
                budget = e2.min_budget_bytes
            plan = planner.plan(model, budget / planner.GiB, batch, measure_time=True)
            label = f"{label}->min"
        plan_s = time.perf_counter() - t0
        m = copy.deepcopy(model)
        wrapped = runtime.apply(m, plan)
        step(wrapped, batch)  # compile
        peak, t = peak_and_time(wrapped, m, batch, device)
        step(wrapped, batch)
        same = all(torch.allclose(p.grad, ref[n], rtol=1e-5, atol=1e-6) for n, p in m.named_parameters() if p.grad is not None)
        maxerr = max((p.grad - ref[n]).abs().max().item() for n, p in m.named_parameters() if p.grad is not None)
        row = {
            "config": f"ilp@{label}",
            "budget": plan.budget_bytes,
            "predicted_peak": plan.predicted_peak_bytes,
            "measured_peak": peak,
            "within_budget": peak <= plan.budget_bytes,
            "pred_error": (plan.predicted_peak_bytes - peak) / peak,
            "predicted_step_s": base_time + plan.recompute_time_s,
            "step_s": t,
            "recompute_flops_frac": plan.overhead,
            "solver": f"{plan.solver.name}: {plan.solver.status}",
            "dropout": plan.dropout,
            "grads_equal": same,
            "max_grad_err": maxerr,
            "plan_s": plan_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows, "baseline_predicted_step_s": base_time}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
