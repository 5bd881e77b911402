"""Plan and apply activation checkpointing for a small GPT-2 at half its eager peak.

Run: python examples/plan_gpt2.py [--layers 4] [--fraction 0.5]
Prints the plan, applies it, runs one training step and compares the measured
peak (torch.profiler allocator events) and gradients with eager.
"""

from __future__ import annotations

import argparse
import copy
import gc

import torch

import planner
import runtime
from profiles import measure_peak, storage_bytes


def build(layers: int):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=256, n_head=8, vocab_size=1000, n_positions=256)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, 1000, (8, 256))
    # use_cache=False as in training (Hugging Face's checkpointing forces it too): the
    # cache's key/value outputs would get zero gradients AOTAutograd materialises.
    return model, {"input_ids": ids, "labels": ids, "use_cache": False}


def step(module, batch):
    torch.manual_seed(0)
    out = module(**batch)
    out.loss.backward()
    return out.loss.detach()


def peak_of(module, model, batch) -> int:
    for p in model.parameters():
        p.grad = None
    gc.collect()
    delta, _ = measure_peak(lambda: step(module, batch))
    static = storage_bytes(list(model.parameters()) + list(model.buffers()) + [v for v in batch.values() if isinstance(v, torch.Tensor)])
    return static + delta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.5, help="budget as a fraction of eager's measured peak")
    args = ap.parse_args()
    model, batch = build(args.layers)
    eager_model = copy.deepcopy(model)
    eager_peak = peak_of(eager_model, eager_model, batch)
    budget_gb = args.fraction * eager_peak / planner.GiB
    print(f"eager peak {eager_peak / 2**20:.1f} MiB; planning for {budget_gb * 1024:.1f} MiB")
    try:
        plan = planner.plan(model, budget_gb, batch, progress=True)
    except planner.BudgetTooSmall as e:
        print(f"{e}\nplanning at the minimum instead")
        plan = planner.plan(model, e.min_budget_bytes / planner.GiB, batch, progress=True)
    print(plan.explain(depth=3, top=5))
    wrapped = runtime.apply(model, plan)
    step(wrapped, batch)  # first step compiles
    measured = peak_of(wrapped, model, batch)
    print(f"measured peak {measured / 2**20:.1f} MiB (predicted {plan.predicted_peak_bytes / 2**20:.1f}, budget {plan.budget_bytes / 2**20:.1f})")
    for p in model.parameters():
        p.grad = None
    for p in eager_model.parameters():
        p.grad = None
    loss_p, loss_e = step(wrapped, batch), step(eager_model, batch)
    same = all(
        torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        for a, b in zip(model.parameters(), eager_model.parameters())
        if a.grad is not None
    )
    print(f"loss planned {loss_p.item():.6f} eager {loss_e.item():.6f}; gradients equal eager: {same}")


if __name__ == "__main__":
    main()
