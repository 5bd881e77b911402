"""The largest batch that fits a budget (``planner.fit_batch``, ``planner batch``) on a tiny GPT-2.

The fit's recommended batch plans within the budget, and one more than its
largest batch does not, each checked by planning it again on its own.
"""

from __future__ import annotations

import pytest
import torch

import planner
from planner.batch import scale_batch

#: Budget in which the tiny GPT-2 below fits a batch of 4 sequences only by recomputing (bytes).
BUDGET = 600_000


def _gpt2():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).train()


def _inputs(batch: int) -> dict:
    ids = torch.randint(0, 64, (batch, 32), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def test_fit_batch_largest_and_recommended():
    model = _gpt2()
    fit = planner.fit_batch(model, BUDGET / planner.GiB, _inputs, start=4, max_batch=64)
    largest, best = fit.largest, fit.recommended
    assert largest is not None and best is not None and best <= largest
    assert [p.batch for p in fit.points] == sorted(p.batch for p in fit.points)
    assert not next(p for p in fit.points if p.batch == largest + 1).fits  # the search tried one more
    assert fit.plan_for(largest).recomputed, "the budget should need recomputation at the largest batch"
    per_sample = {p.batch: p.time_per_sample_s for p in fit.feasible}
    assert per_sample[best] == min(per_sample.values())
    assert f"largest batch that fits {largest}, best estimated throughput at batch {best}" in fit.table()
    assert "does not fit (needs" in fit.table()
    p = planner.plan(model, BUDGET / planner.GiB, _inputs(best))
    assert p.predicted_peak_bytes <= p.budget_bytes == BUDGET
    with pytest.raises(planner.BudgetTooSmall):
        planner.plan(model, BUDGET / planner.GiB, _inputs(largest + 1))


def test_scale_batch_repeats_samples():
    x = {"input_ids": torch.arange(6).view(2, 3), "flag": True}
    y = scale_batch(x, 5)
    assert y["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5], [0, 1, 2]] and y["flag"] is True
    assert scale_batch(x, 1)["input_ids"].tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="cannot tell the batch size"):
        scale_batch((torch.zeros(2, 3), torch.zeros(3, 3)), 4)


def test_cli_batch_one_size(tmp_path, capsys):
    from runtime.tools.cli import main

    factory = tmp_path / "f.py"
    factory.write_text("import sys\nsys.path.insert(0, %r)\nfrom test_batch import _gpt2, _inputs\n"
                       "def model():\n    return _gpt2(), _inputs(1)\n" % str(__import__("pathlib").Path(__file__).parent))
    png = tmp_path / "batch.png"
    assert main(["batch", f"{factory}:model", "--budget-gb", str(BUDGET / planner.GiB), "--start", "4",
                 "--max-batch", "4", "--plot", str(png), "-q"]) == 0
    out = capsys.readouterr().out
    assert "best estimated throughput at batch 4" in out and "<- recommended" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["batch", f"{factory}:model", "--budget-gb", "1", "--start", "8", "--max-batch", "4"]) == 2
