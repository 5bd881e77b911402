"""A small GPT-2 trained by ``transformers.Trainer`` with ``deepspeed=`` (ZeRO-2), planned by us.

    DS_ACCELERATOR=cpu python examples/deepspeed_tutorial/trainer_gpt2.py

(on GPUs leave out ``DS_ACCELERATOR``, and launch with ``torchrun`` or ``deepspeed`` for
several ranks). The Trainer runs the same DeepSpeed config twice: without a plan, then
with ``plan_trainer(trainer, budget_gb, deepspeed=config)``, which plans one rank of the
engine the config describes (here halfway from the planner's minimum to the
no-checkpoint peak) and makes the Trainer train the planned module. It prints how many
values the plan recomputes and whether the final weights equal the unplanned run's;
the exit status is 1 when they differ.
"""

from __future__ import annotations

import os

import torch

import planner
from runtime.tools.trainer import plan_trainer, trainer_batch

#: ZeRO-2 with 2 accumulated micro-batches; a small reduce bucket, so that the bucket
#: does not set the rank's peak whatever is checkpointed.
CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 5000},
}


def _model():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).train()


def _dataset() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids} for ids in (torch.randint(0, 64, (32,), generator=g) for _ in range(8))]


def _budget_gb(trainer) -> float:
    """Halfway from the planner's minimum to the no-checkpoint peak, per rank, with the engine."""
    batch = trainer_batch(trainer)
    peak = planner.plan(trainer.model, 64.0, batch, deepspeed=CONFIG).baseline_peak_bytes
    try:
        planner.plan(trainer.model, 1e-6, batch, deepspeed=CONFIG)
    except planner.BudgetTooSmall as e:
        return (e.min_budget_bytes + peak) / 2 / planner.GiB
    return peak / planner.GiB


def train(planned: bool, out_dir: str) -> tuple[planner.Plan | None, dict]:
    """Two optimizer steps; the plan (None without one) and the final weights."""
    import transformers

    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-3, logging_strategy="no", save_strategy="no", report_to=[], seed=0,
        remove_unused_columns=False, disable_tqdm=True, deepspeed=CONFIG,
    )
    model = _model()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset())
    plan = plan_trainer(trainer, _budget_gb(trainer), deepspeed=CONFIG) if planned else None
    trainer.train()
    return plan, {n: p.detach().clone() for n, p in model.named_parameters()}


def main() -> int:
    import tempfile

    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29541")):
        os.environ.setdefault(key, value)  # one process unless a launcher set them
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    with tempfile.TemporaryDirectory() as out:
        _, ref = train(False, out)
        plan, got = train(True, out)
    equal = all(torch.equal(got[k], ref[k]) for k in ref)
    print(f"plan: {len(plan.recomputed)} values recomputed, predicted peak {plan.predicted_peak_bytes} B "
          f"of {plan.budget_bytes} B per rank")
    print(f"weights after 2 steps: {'equal to' if equal else 'DIFFERENT from'} the Trainer without a plan")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
