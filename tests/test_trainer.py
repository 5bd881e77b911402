"""A tiny GPT-2 planned by ``runtime.tools.trainer.plan_trainer`` trains through ``transformers.Trainer``
(2 accumulated micro-batches per step, AdamW; in fp32 and with ``bf16=True``) to the same weights as the
same Trainer run without a plan."""

from __future__ import annotations

import pytest
import torch

import planner
from runtime.module import PlannedModule
from runtime.tools.trainer import plan_trainer
from test_batch import _gpt2

#: Bytes in which the tiny GPT-2's step of 2 sequences fits only by recomputing, by ``bf16``
#: (no-checkpoint peaks about 410,000 and 296,000 bytes; minimums about 328,000 and 224,000).
BUDGET = {False: 370_000, True: 260_000}


def _dataset() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(8):
        ids = torch.randint(0, 64, (32,), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _train(tmp_path, planned: bool, bf16: bool):
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-3, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0,
        remove_unused_columns=False, disable_tqdm=True, bf16=bf16,
    )
    model = _gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset())
    plan = plan_trainer(trainer, BUDGET[bf16] / planner.GiB) if planned else None
    trainer.train()
    return plan, trainer, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trainer_with_plan_equals_trainer_without(tmp_path, bf16):
    _, _, ref = _train(tmp_path / "ref", planned=False, bf16=bf16)
    plan, trainer, got = _train(tmp_path / "planned", planned=True, bf16=bf16)
    assert plan.recomputed, "the budget should force recomputation"
    assert plan.model.autocast == ("cpu:bfloat16" if bf16 else "off")
    assert isinstance(trainer.model, PlannedModule)
    assert trainer.state.global_step == 2
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.equal(got[n], _gpt2().state_dict()[n]) for n in got), "the weights should have changed"
