"""A tiny GPT-2 planned by ``runtime.tools.trainer.plan_trainer`` trains through ``transformers.Trainer``
(2 accumulated micro-batches per step, AdamW; in fp32 and with ``bf16=True``) to the same weights as the
same Trainer run without a plan; so does a model that breaks the graph (planned as graph regions)."""

from __future__ import annotations

import pytest
import torch

import planner
from runtime.module import PlannedModule
from runtime.tools.trainer import plan_trainer
from helpers import BreakyLM
from test_batch import _gpt2

#: Bytes in which the tiny GPT-2's step of 2 sequences fits only by recomputing, by ``bf16``
#: (no-checkpoint peaks about 410,000 and 296,000 bytes; minimums about 328,000 and 224,000).
BUDGET = {False: 370_000, True: 260_000}
#: Bytes in which :class:`helpers.BreakyLM`'s step of 2 sequences fits only by recomputing, by ``bf16``
#: (no-checkpoint peaks about 456,000 and 393,000 bytes; minimums about 351,000 and 319,000).
BREAKY_BUDGET = {False: 400_000, True: 350_000}


def _dataset() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(8):
        ids = torch.randint(0, 64, (32,), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _breaky():
    torch.manual_seed(0)
    return BreakyLM().train()


def _train(tmp_path, planned: bool, bf16: bool, build=_gpt2, budget: int | None = None):
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-3, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0,
        remove_unused_columns=False, disable_tqdm=True, bf16=bf16,
    )
    model = build()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset())
    plan = plan_trainer(trainer, (budget or BUDGET[bf16]) / planner.GiB) if planned else None
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


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trainer_with_region_plan_equals_trainer_without(tmp_path, bf16):
    """A model that breaks the graph (a ``print`` and a branch on a tensor between its blocks),
    called with the Trainer's batch and ``num_items_in_batch``: planned as three graph regions,
    it trains through the Trainer to the weights of the Trainer without a plan."""
    _, _, ref = _train(tmp_path / "ref", planned=False, bf16=bf16, build=_breaky)
    plan, trainer, got = _train(tmp_path / "planned", planned=True, bf16=bf16, build=_breaky,
                                budget=BREAKY_BUDGET[bf16])
    assert len(plan.regions) == 3 and plan.recomputed, "the budget should force recomputation in a region plan"
    assert plan.model.autocast == ("cpu:bfloat16" if bf16 else "off")
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert trainer.model_accepts_loss_kwargs and "num_items_in_batch" in {i[0] for i in plan.model.to_dict()["inputs"]}
    assert isinstance(trainer.model, PlannedModule) and trainer.state.global_step == 2
    assert len(trainer.model.compiled_graphs) >= 3, "each region should run its planned split"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.equal(got[n], _breaky().state_dict()[n]) for n in got), "the weights should have changed"
