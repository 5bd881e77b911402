"""Dropout under a plan: masks regenerated from RNG state are the forward's masks,
plans that recompute them are exact, and the generator ends where eager's does."""

from __future__ import annotations

import copy

import pytest
import torch

import planner
import runtime
from helpers import assert_same_step, measured_step_peak, run_step, tiny_gpt2
from planner.api import plan_profile
from planner.zero_tangents import profile_as_run
from profiles import capture, profile_graph


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 33), (4, 8, 64, 64)])
@pytest.mark.parametrize("p", [0.1, 0.15, 0.5])
def test_replayed_mask_rebuilds_eager_dropout_bit_for_bit(dtype, shape, p):
    """The replayed mask is the drawn one, and ``x * mask * scale`` and
    ``grad * mask * scale`` are eager CPU dropout's output and gradient, bit for bit
    (``native_dropout``'s own differ at p=0.15 in fp32 and at most p in bf16/fp16)."""
    from profiles.dropout_pass import _scale

    x = torch.randn(*shape).to(dtype).requires_grad_(True)
    grad = torch.randn(*shape).to(dtype)
    torch.manual_seed(11)
    state = torch.ops.planner_rng.state(x)
    _, mask = torch.ops.aten.native_dropout(x.detach(), p, True)
    after = torch.get_rng_state()
    replayed = torch.ops.planner_rng.replay_dropout_mask(state, list(x.shape), list(x.stride()), x.dtype, x.device, p)
    assert torch.equal(replayed, mask)
    assert torch.equal(torch.get_rng_state(), after), "replay must leave the generator as it found it"
    torch.set_rng_state(state)
    eager = torch.nn.functional.dropout(x, p, True)
    eager.backward(grad)
    assert torch.equal(_bits(x.detach() * replayed * _scale(p, x)), _bits(eager.detach()))
    assert torch.equal(_bits(grad * replayed * _scale(p, grad)), _bits(x.grad))


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = tiny_gpt2(layers=2, d=64, heads=4, vocab=128, positions=64)
    ids = torch.randint(0, 128, (8, 64))
    inputs = {"input_ids": ids, "labels": ids}
    probe = copy.deepcopy(model)
    return model, inputs, measured_step_peak(probe, probe, inputs)


@pytest.mark.parametrize("mode", ["mask", "replay"])
def test_dropout_modes_are_exact_and_leave_rng_as_eager(gpt2, mode):
    model, inputs, eager = gpt2
    joint = capture(model, inputs, dropout=mode)
    assert joint.num_dropouts > 0
    gp = profile_graph(joint)
    joint.drop_tensors()
    try:
        p = plan_profile(gp, int(0.6 * eager))
    except planner.BudgetTooSmall as e:
        p = plan_profile(gp, e.min_budget_bytes)
    assert p.dropout == mode and p.recomputed
    if mode == "replay":
        assert any(n.op.startswith("planner_rng.replay") and n.decision == "recompute" for n in p.nodes)
    # the generator advances exactly as in eager: where eager's step at seed 3 leaves it, ...
    run_step(copy.deepcopy(model), inputs, seed=3)
    eager_next = torch.rand(4)
    # ... the planned step (its first call, which compiles) leaves it too: assert_same_step's
    # last draw is that step's (it then only compares outputs, gradients and buffers)
    assert_same_step(model, lambda m: runtime.apply(m, p), inputs, seed=3)
    assert torch.equal(torch.rand(4), eager_next)


def test_with_dropout_equals_capturing_again():
    """plan() captures once and rewrites a copy for RNG replay: that copy must be the
    graph a second capture would give."""
    from profiles.capture import with_dropout
    from profiles.signature import graph_fingerprint

    ids = torch.randint(0, 128, (2, 32))
    model = tiny_gpt2(layers=1, d=32, heads=2, vocab=128, positions=32)
    inputs = {"input_ids": ids, "labels": ids}
    first = capture(model, inputs, dropout="mask")
    derived = with_dropout(first, "replay")
    again = capture(model, inputs, dropout="replay")
    assert derived.num_dropouts == again.num_dropouts > 0
    n = first.num_fwd_outputs
    assert graph_fingerprint(derived.gm, n) == graph_fingerprint(again.gm, n)
    assert graph_fingerprint(first.gm, n) != graph_fingerprint(again.gm, n)
    # the derived graph is a copy: the mask-mode graph is untouched
    assert graph_fingerprint(with_dropout(derived, "mask").gm, n) == graph_fingerprint(first.gm, n)


def test_plan_keeps_the_cheaper_dropout_treatment(gpt2):
    """When the plan recomputes, plan() plans with kept masks and with RNG replay and
    returns the cheaper: recompute time, plus replay's extra mask draw per dropout in
    forward."""
    from profiles.capture import with_dropout

    model, inputs, eager = gpt2
    budget = int(0.6 * eager)
    joint = capture(model, inputs, dropout="mask")
    costs = {}
    for mode, j in (("mask", joint), ("replay", with_dropout(joint, "replay"))):
        gp = profile_as_run(profile_graph(j), loss="model", blocks=False)  # as plan() profiles a model returning its loss
        p = plan_profile(gp, budget)
        extra = sum(n.time_s for n in gp.nodes.values() if "replay_dropout_mask" in n.op and n.phase == "forward")
        costs[mode] = (p.recompute_time_s + extra, p.recomputed)
    assert costs["mask"][1], "the budget must need recomputation for this test to mean anything"
    want = min(costs, key=lambda m: costs[m][0])
    got = planner.plan(model, budget / planner.GiB, inputs)
    assert got.dropout == want
    assert set(got.recomputed) == set(costs[want][1])
