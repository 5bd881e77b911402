"""Train a model planned by us through Hugging Face ``transformers.Trainer``: :func:`plan_trainer`.

``plan_trainer(trainer, budget_gb)`` plans ``trainer.model`` on a batch as the
Trainer feeds it (its data collator over the first
``per_device_train_batch_size`` training examples, plus the ``num_items_in_batch``
count the Trainer passes to models that take loss keywords) and makes the trainer
train ``runtime.apply(model, plan)``: the planned module holds the same parameters,
so the Trainer's optimizer, scheduler and gradient accumulation see the model's
own. Call it after building the Trainer and before ``trainer.train()``. With
``bf16=True`` or ``fp16=True`` the step is planned under the autocast the Trainer's
``accelerate.Accelerator`` runs the model's forward in.
"""

from __future__ import annotations

from typing import Any

import torch

import planner
from runtime.module import PlannedModule, apply

__all__ = ["plan_trainer", "trainer_batch"]


def trainer_batch(trainer: Any) -> dict:
    """One training batch as ``trainer`` calls its model with it: collated, on the
    Trainer's device, with ``num_items_in_batch`` when the model takes loss keywords."""
    args = trainer.args
    dataset = trainer.train_dataset
    if dataset is None:
        raise ValueError("the Trainer has no train_dataset: plan_trainer plans on its first training batch")
    n = min(args.per_device_train_batch_size, len(dataset))
    batch = trainer.data_collator([dataset[i] for i in range(n)])
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise TypeError(f"the Trainer's data collator returned {type(batch).__name__}: plan_trainer needs a dict of "
                        "model inputs, as the Trainer passes them to the model (model(**batch))")
    batch = {k: (v.to(args.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if trainer.model_accepts_loss_kwargs and isinstance(batch.get("labels"), torch.Tensor):
        # the Trainer counts the labelled tokens of the whole accumulation window, as a float32 scalar
        # (transformers 5); only its shape and dtype count here
        batch["num_items_in_batch"] = batch["labels"].ne(-100).sum().to(torch.float32)
    return batch


def plan_trainer(trainer: Any, budget_gb: float, **plan_kwargs) -> planner.Plan:
    """Plan ``trainer.model`` for ``budget_gb`` on :func:`trainer_batch` and make the trainer
    train the planned module. ``plan_kwargs`` go to :func:`planner.plan` (``world_size``,
    ``sharding``, ``optimizer``, ``deepspeed``...). Returns the plan."""
    model = trainer.model
    if isinstance(model, PlannedModule):
        raise ValueError("the Trainer's model is already a planned module: plan_trainer plans the model itself once")
    if getattr(trainer, "optimizer", None) is not None:
        raise ValueError("the Trainer already has its optimizer: call plan_trainer before trainer.train()")
    was_training = model.training
    model.train()
    try:
        with trainer.accelerator.autocast():  # the Trainer's mixed precision (a no-op without it)
            plan = planner.plan(model, budget_gb, trainer_batch(trainer), **plan_kwargs)
    finally:
        model.train(was_training)
    planned = apply(model, plan)
    trainer.model = trainer.model_wrapped = planned
    return plan
