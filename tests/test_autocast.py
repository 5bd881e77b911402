"""Mixed precision under a plan: with ``torch.autocast`` (bf16, fp16 with a GradScaler)
or bf16 parameters, and dropout on, a plan that recomputes gives eager's outputs,
gradients and weights bit for bit, stays within its budget, and is refused under
another autocast than it was planned under. ``plan()`` itself writes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import planner
import runtime
from helpers import static_bytes, tiny_gpt2
from planner.api import plan_profile
from profiles import capture, measure_peak, profile_graph


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers: equal exactly when the floats are bit for bit equal."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _gpt2():
    torch.manual_seed(0)
    model = tiny_gpt2(layers=2, d=64, heads=4, vocab=128, positions=64)
    assert model.config.resid_pdrop > 0 and model.config.attn_pdrop > 0  # dropout on
    return model, {"input_ids": torch.randint(0, 128, (4, 64))}


def _recomputing_plan(gp) -> planner.Plan:
    """A plan for ``gp`` at half its activation memory (or the least it can reach)."""
    base = plan_profile(gp, 2**40)
    try:
        return plan_profile(gp, base.static_bytes + (base.baseline_peak_bytes - base.static_bytes) // 2)
    except planner.BudgetTooSmall as e:
        return plan_profile(gp, e.min_budget_bytes)


def _step(module, inputs, amp, scaler):
    """A seeded step as the AMP documentation writes it: forward and loss under
    autocast (``amp`` None: none), ``backward`` of the (scaled) loss outside it."""
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = module(**inputs)
        loss = out.logits.float().pow(2).mean()
    scaler.scale(loss).backward()
    return out.logits.detach(), loss.detach()


def _assert_step_bit_exact(model, p, inputs, amp, *, fp16: bool) -> None:
    eager, planned = copy.deepcopy(model), copy.deepcopy(model)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=fp16) for _ in range(2)]
    got = _step(runtime.apply(planned, p), inputs, amp, scalers[1])
    want = _step(eager, inputs, amp, scalers[0])
    for name, a, b in zip(("logits", "loss"), got, want):
        assert torch.equal(_bits(a), _bits(b)), name
    grads = 0
    for (name, pe), (_, pp) in zip(eager.named_parameters(), planned.named_parameters()):
        assert pe.grad is not None and pp.grad is not None, name
        assert torch.equal(_bits(pp.grad), _bits(pe.grad)), f"grad of {name}"
        grads += 1
    assert grads == len(list(model.parameters()))
    for m, scaler in ((eager, scalers[0]), (planned, scalers[1])):
        scaler.step(torch.optim.AdamW(m.parameters()))
    for (name, pe), (_, pp) in zip(eager.named_parameters(), planned.named_parameters()):
        assert torch.equal(_bits(pp.detach()), _bits(pe.detach())), f"{name} after the optimizer step"


@pytest.mark.parametrize("mode", ["mask", "replay"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_with_dropout_is_bit_exact(mode, amp):
    """Under autocast (fp16 with a GradScaler) a recomputing plan's logits, loss,
    gradients and, after ``scaler.step``, weights are eager's bit for bit: residual
    dropout runs in the autocast dtype, attention dropout in fp32 inside the math
    attention kernel, whose backward eager runs without autocast."""
    model, inputs = _gpt2()
    with torch.autocast("cpu", dtype=amp):
        joint = capture(model, inputs, dropout=mode)
    gp = profile_graph(joint)
    joint.drop_tensors()
    p = _recomputing_plan(gp)
    assert p.recomputed and p.dropout == mode
    if mode == "replay":
        assert any(n.op.startswith("planner_rng.replay") and n.decision == "recompute" for n in p.nodes)
    _assert_step_bit_exact(model, p, inputs, amp, fp16=amp == torch.float16)


def test_bf16_parameters_with_dropout_are_bit_exact():
    """A model whose parameters are bf16 (no autocast), dropout rebuilt from kept masks."""
    model, inputs = _gpt2()
    model.to(torch.bfloat16)
    joint = capture(model, inputs, dropout="mask")
    gp = profile_graph(joint)
    joint.drop_tensors()
    p = _recomputing_plan(gp)
    assert p.recomputed
    _assert_step_bit_exact(model, p, inputs, None, fp16=False)


def _labelled_step(module, inputs, amp):
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=amp):
        loss = module(**inputs).loss
    loss.backward()


def test_plan_under_autocast_holds_its_budget_and_refuses_other_autocast(capfd):
    """``plan()`` under autocast writes nothing, records the autocast, and the planned
    step's measured peak under it is within the budget; the same plan run without
    autocast or with another dtype raises AutocastMismatch saying which."""
    model, inputs = _gpt2()
    inputs["labels"] = inputs["input_ids"]
    amp = torch.bfloat16
    eager_peak = static_bytes(model, inputs) + measure_peak(lambda: _labelled_step(model, inputs, amp))[0]
    model.zero_grad(set_to_none=True)
    budget = static_bytes(model, inputs) + 0.6 * (eager_peak - static_bytes(model, inputs))
    capfd.readouterr()
    with torch.autocast("cpu", dtype=amp):
        p = planner.plan(model, budget / planner.GiB, inputs)
    assert capfd.readouterr() == ("", "")
    assert p.model.autocast == "cpu:bfloat16" and p.recomputed
    wrapped = runtime.apply(model, p)
    peak = static_bytes(model, inputs) + measure_peak(lambda: _labelled_step(wrapped, inputs, amp))[0]
    assert peak <= p.budget_bytes, (peak, p.budget_bytes, p.predicted_peak_bytes)
    with pytest.raises(runtime.AutocastMismatch, match=r'made under torch.autocast\("cpu", dtype=torch.bfloat16\) '
                       r"but this training step runs without autocast.*plan again"):
        wrapped(**inputs)
    with pytest.raises(runtime.AutocastMismatch, match=r"runs under torch.autocast\(\"cpu\", dtype=torch.float16\)"):
        _labelled_step(wrapped, inputs, torch.float16)


def test_plan_writes_nothing_and_a_plan_without_autocast_is_refused_under_it(capfd):
    """With ``progress=False`` ``plan()`` writes nothing to file descriptors 1 and 2
    (the profiler's start/stop notices included); its plan records no autocast and
    is refused under one."""
    model, inputs = _gpt2()
    capfd.readouterr()
    p = planner.plan(model, 1.0, inputs)
    assert capfd.readouterr() == ("", "")
    assert p.model.autocast == "off"
    assert planner.Plan.from_json(p.to_json()).model.autocast == "off"
    with pytest.raises(runtime.AutocastMismatch, match=r'made without autocast but this training step runs under '
                       r'torch.autocast\("cpu", dtype=torch.bfloat16\).*plan again'):
        _step(runtime.apply(model, p), inputs, torch.bfloat16, torch.amp.GradScaler("cpu", enabled=False))
