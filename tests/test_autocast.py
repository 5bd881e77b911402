"""Mixed precision under a plan: with ``torch.autocast`` (bf16, fp16 with a GradScaler)
or bf16 parameters, and dropout on, a plan that recomputes gives eager's outputs,
gradients and weights bit for bit, stays within its budget, and is refused under
another autocast than it was planned under. ``plan()`` itself writes nothing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

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
    ids = torch.randint(0, 128, (2, 32))
    return model, {"input_ids": ids, "labels": ids}


def _replays(p: planner.Plan) -> bool:
    """Whether ``p`` regenerates a dropout mask in backward from the saved RNG state."""
    return any(n.op.startswith("planner_rng.replay") and n.decision == "recompute" for n in p.nodes)


def _recomputing_plan(gp) -> planner.Plan:
    """A plan for ``gp`` at 80% of its activation memory (it recomputes); with RNG
    replay at the first of 70%, 60%, 50% where a mask is regenerated."""
    base = plan_profile(gp, 2**40)
    act = base.baseline_peak_bytes - base.static_bytes
    for fraction in (0.8,) if gp.joint.dropout == "mask" else (0.7, 0.6, 0.5):
        p = plan_profile(gp, base.static_bytes + int(fraction * act))
        if p.dropout == "mask" or _replays(p):
            break
    assert p.recomputed and p.dropout == gp.joint.dropout
    assert p.dropout == "mask" or _replays(p)
    return p


#: ``scale`` and ``step`` pass through: the loop without a GradScaler.
_NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def _step(module, inputs, amp, scaler):
    """A seeded step as the AMP documentation writes it: forward and loss under
    autocast (``amp`` None: none), ``backward`` of the (scaled) loss outside it."""
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = module(**inputs)
    scaler.scale(out.loss).backward()
    return out.logits.detach(), out.loss.detach()


def _assert_step_bit_exact(model, p, inputs, amp) -> None:
    """One step of ``model`` planned by ``p`` against eager's: logits, loss, every
    gradient and every weight after an AdamW step (through the scaler) bit for bit
    equal; then a second step of the planned module measured within the budget."""
    eager, planned = copy.deepcopy(model), copy.deepcopy(model)
    wrapped = runtime.apply(planned, p)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=amp == torch.float16) for _ in range(2)]
    got = _step(wrapped, inputs, amp, scalers[1])
    want = _step(eager, inputs, amp, scalers[0])
    for name, a, b in zip(("logits", "loss"), got, want):
        assert torch.equal(_bits(a), _bits(b)), name
    params = list(zip(eager.named_parameters(), planned.named_parameters()))
    assert len(params) == len(list(model.parameters())) > 0
    for (name, pe), (_, pp) in params:
        assert pe.grad is not None and pp.grad is not None, name
        assert torch.equal(_bits(pp.grad), _bits(pe.grad)), f"grad of {name}"
    for m, scaler in ((eager, scalers[0]), (planned, scalers[1])):
        scaler.step(torch.optim.AdamW(m.parameters()))
    for (name, pe), (_, pp) in params:
        assert torch.equal(_bits(pp.detach()), _bits(pe.detach())), f"{name} after the optimizer step"
    assert not torch.equal(eager.lm_head.weight, model.lm_head.weight), "the optimizer step was skipped"
    planned.zero_grad(set_to_none=True)
    peak = static_bytes(planned, inputs) + measure_peak(lambda: _step(wrapped, inputs, amp, scalers[1]))[0]
    assert peak <= p.budget_bytes, (peak, p.budget_bytes, p.predicted_peak_bytes)


def _plan(model, inputs, amp, capfd) -> planner.Plan:
    """``plan()`` under autocast ``amp`` (None: none) at 80% of the eager step's
    measured activation memory; it must write nothing to file descriptors 1 and 2."""
    probe = copy.deepcopy(model)
    static = static_bytes(model, inputs)
    eager_peak = static + measure_peak(lambda: _step(probe, inputs, amp, _NO_SCALER))[0]
    capfd.readouterr()
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        p = planner.plan(model, (static + 0.8 * (eager_peak - static)) / planner.GiB, inputs)
    written = capfd.readouterr()
    assert written == ("", ""), f"plan() wrote {written}"
    assert p.recomputed
    return p


def test_fp16_autocast_with_grad_scaler_and_replayed_dropout_is_bit_exact():
    """Under fp16 autocast with a GradScaler, with dropout masks regenerated in
    backward from the RNG state, a recomputing plan's logits, loss, gradients and,
    after ``scaler.step``, weights are eager's bit for bit (residual dropout runs
    in fp16, attention dropout in fp32 inside the math attention kernel, whose
    backward eager runs without autocast), and its measured peak is within the
    budget. (Kept masks under autocast: the bf16 test below.)"""
    model, inputs = _gpt2()
    with torch.autocast("cpu", dtype=torch.float16):
        joint = capture(model, inputs, dropout="replay")
    p = _recomputing_plan(profile_graph(joint))
    joint.drop_tensors()
    assert p.dropout == "replay"
    _assert_step_bit_exact(model, p, inputs, torch.float16)


def test_bf16_autocast_plan_is_exact_within_budget_and_refused_under_another_autocast(capfd):
    """``plan()`` under bf16 autocast writes nothing and records the autocast; the
    planned step is eager's bit for bit and within budget; the plan run without
    autocast, or under fp16, raises AutocastMismatch saying which, before anything
    is compiled."""
    model, inputs = _gpt2()
    p = _plan(model, inputs, torch.bfloat16, capfd)
    assert p.model.autocast == "cpu:bfloat16"
    assert p.dropout == "mask", "this case covers kept dropout masks under autocast (fp16 covers RNG replay)"
    _assert_step_bit_exact(model, p, inputs, torch.bfloat16)
    wrapped = runtime.apply(model, p)
    with pytest.raises(runtime.AutocastMismatch, match=r'made under torch.autocast\("cpu", dtype=torch.bfloat16\) '
                       r"but this training step runs without autocast.*plan again"):
        _step(wrapped, inputs, None, _NO_SCALER)
    with pytest.raises(runtime.AutocastMismatch, match=r'runs under torch.autocast\("cpu", dtype=torch.float16\)'):
        _step(wrapped, inputs, torch.float16, _NO_SCALER)
    assert not wrapped.compiled_graphs


def test_bf16_parameters_with_dropout_are_exact_and_refused_under_autocast(capfd):
    """A model whose parameters are bf16, without autocast: ``plan()`` writes
    nothing and records no autocast (also through JSON); the planned step is
    eager's bit for bit and within budget, and refused under autocast."""
    model, inputs = _gpt2()
    model.to(torch.bfloat16)
    p = _plan(model, inputs, None, capfd)
    assert p.model.autocast == "off"
    assert planner.Plan.from_json(p.to_json()).model.autocast == "off"
    _assert_step_bit_exact(model, p, inputs, None)
    with pytest.raises(runtime.AutocastMismatch, match=r'made without autocast but this training step runs under '
                       r'torch.autocast\("cpu", dtype=torch.bfloat16\).*plan again'):
        _step(runtime.apply(model, p), inputs, torch.bfloat16, _NO_SCALER)


class _NormedMLP(torch.nn.Module):
    """Linear layers with an fp32 LayerNorm between them: under CPU bf16 autocast each
    LayerNorm takes a bf16 input with fp32 weights (mean and rstd come back in fp32)."""

    def __init__(self, d: int = 64, layers: int = 4):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d)) for _ in range(layers)
        )
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))

    def forward(self, x):
        for block, norm in zip(self.blocks, self.norms):
            x = x + block(norm(x))
        return x.float().square().mean()


def test_bf16_autocast_layer_norm_statistics_are_counted_as_the_cpu_kernel_returns_them():
    """The CPU kernel returns a mixed-precision LayerNorm's mean and rstd in fp32 (the
    traced graph says bf16): the plan counts them so, measures its op temporaries
    without failing, and predicts the measured peak."""
    torch.manual_seed(0)
    model, x = _NormedMLP(), torch.randn(512, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        joint = capture(model, (x,))
    stats = [n for n in joint.gm.graph.nodes if n.target is torch.ops.aten.native_layer_norm.default]
    assert stats and all(n.meta["val"][1].dtype == torch.float32 for n in stats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with planner.prepare(model, (x,)) as step:  # the suite runs with warnings as errors: no unmeasured temporaries
            full = step.plan(planner.GiB)
            p = step.plan(int(full.static_bytes + 0.6 * (full.baseline_peak_bytes - full.static_bytes)))
    assert p.recomputed
    wrapped = runtime.apply(model, p)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(x)
        loss.backward()

    step()
    model.zero_grad(set_to_none=True)
    peak, _ = measure_peak(step)
    measured = static_bytes(model, (x,)) + peak
    assert measured <= p.budget_bytes and abs(measured - p.predicted_peak_bytes) <= 0.05 * measured, (
        measured, p.predicted_peak_bytes, p.budget_bytes)


def test_bf16_autocast_batch_norm_statistics_are_counted_as_the_cpu_kernel_returns_them():
    """Likewise for BatchNorm: its saved mean and invstd are fp32 on the CPU under bf16
    autocast; recorded so, the batch-norm backward's temporaries are measured (on bf16
    statistics with an fp32 weight it refused to run, and the planner warned)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 2))
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        joint = capture(model.train(), (x,))
        stats = [n for n in joint.gm.graph.nodes if "batch_norm_legit" in str(n.target)]
        assert stats and all(n.meta["val"][1].dtype == torch.float32 for n in stats)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            planner.plan(model, 1.0, (x,))
