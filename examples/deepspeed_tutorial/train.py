"""The DeepSpeed tutorial's SimpleModel, planned by us, trained under its ZeRO-2 config on every rank.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_tutorial/train.py --budget-gb 3
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_tutorial/train.py \
        --reduce-bucket-size 1200000 --budget-gb 0.032   # recomputes

(on GPUs leave out ``DS_ACCELERATOR``). Every rank plans for one rank of the
engine that ``ds_config.json`` describes (ZeRO-2, 4 accumulated micro-batches,
AdamW), then trains ``runtime.apply(model, plan)`` under ``deepspeed.initialize``.
The config keeps DeepSpeed's default reduce bucket (5e8 elements, 1.9 GiB in fp32),
which the budget must hold; set ``zero_optimization.reduce_bucket_size`` to plan
for less.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch

import planner
import runtime
from simple_model import SimpleModel, batch

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gb", type=float, required=True, help="GiB per rank: the engine's bytes and the step")
    ap.add_argument("--reduce-bucket-size", type=int, help="elements of ZeRO's gradient bucket (default: the config's)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps (each of 4 micro-batches)")
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank = torch.distributed.get_rank()
    config = json.loads((HERE / "ds_config.json").read_text())
    if args.reduce_bucket_size:
        config["zero_optimization"]["reduce_bucket_size"] = args.reduce_bucket_size
    torch.manual_seed(0)
    model = SimpleModel().train()
    plan = planner.plan(model, args.budget_gb, batch(), deepspeed=config)  # the ranks: the process group's
    if rank == 0:
        print(plan.summary(), flush=True)
    engine, *_ = deepspeed.initialize(model=runtime.apply(model, plan), model_parameters=model.parameters(),
                                      config=config)
    for i in range(args.steps * engine.gradient_accumulation_steps()):
        loss = engine(**batch(seed=100 * rank + i))
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if rank == 0 and boundary:
            print(f"optimizer step {engine.global_steps}: last micro-batch loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
