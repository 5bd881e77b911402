"""Inputs of other shapes than planned: training stays exact.

Same graph apart from sizes (another batch size, another sequence length): the
plan's decisions are reused, the step re-simulated, and a BudgetWarning raised
when that peak is over the budget. A graph whose structure changes with the
shapes is planned again at the plan's budget (ShapeWarning).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

import planner
import runtime
from helpers import ResidualNet, assert_same_step, measured_step_peak, run_step, static_bytes, tiny_gpt2
from profiles import measure_peak


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 32, generator=g), "target": torch.randint(0, 8, (n,), generator=g)}


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    model = ResidualNet(d=32, blocks=4, hidden=128)
    inputs = _batch(256)
    probe = copy.deepcopy(model)
    eager = measured_step_peak(probe, probe, inputs)
    p = planner.plan(model, 0.6 * eager / planner.GiB, inputs)
    assert p.recomputed
    return model, inputs, p


def _key(inputs) -> str:
    return json.dumps([[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in inputs.items()])


def test_last_smaller_batch_reuses_the_decisions_exactly_and_within_budget(residual):
    model, _, p = residual
    small = _batch(100, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within budget: no warning
        wrapped, planned_model = assert_same_step(model, lambda m: runtime.apply(m, p), small)
    entry = wrapped.shapes[_key(small)]
    assert isinstance(entry, runtime.ShapeEntry) and entry.how == "reused" and entry.plan is p
    (fwd, bwd), = wrapped.compiled_graphs
    assert {n.name for n in bwd.graph.nodes} >= set(p.recomputed) - {n.name for n in fwd.graph.nodes}
    measured = measured_step_peak(wrapped, planned_model, small)
    assert measured <= p.budget_bytes
    # re-simulated at the new sizes (without op temporaries): within 5% of what runs
    assert abs(entry.predicted_peak_bytes - measured) <= 0.05 * measured, (entry.predicted_peak_bytes, measured)


def test_larger_batch_warns_when_predicted_over_budget_and_stays_exact(residual):
    model, _, p = residual
    big = _batch(512, seed=2)
    with pytest.warns(runtime.BudgetWarning, match="over the budget"):
        wrapped, planned_model = assert_same_step(model, lambda m: runtime.apply(m, p), big)
    entry = wrapped.shapes[_key(big)]
    assert entry.how == "reused" and entry.predicted_peak_bytes > p.budget_bytes
    measured = measured_step_peak(wrapped, planned_model, big)
    assert abs(entry.predicted_peak_bytes - measured) <= 0.05 * measured


def test_new_shapes_honour_the_plans_training_loop(residual):
    """Re-simulated at a smaller batch, a ``grad_accumulation`` plan's step counts the
    gradients held from the micro-step before: a micro-step that adds into them
    measures within 5% of that prediction. A plan that counts ``loss_fn`` (captured
    at the planned shapes) or an optimizer step is not re-simulated."""
    model, _, p = residual
    small = _batch(100, seed=1)
    accumulating = dataclasses.replace(p, training_loop=dataclasses.replace(p.training_loop, grad_accumulation=True))
    planned_model = copy.deepcopy(model)
    wrapped = runtime.apply(planned_model, accumulating)
    run_step(wrapped, small)  # compiles; leaves the gradients the next micro-step adds into
    predicted = wrapped.shapes[_key(small)].predicted_peak_bytes
    grads = sum(q.numel() * q.element_size() for q in model.parameters() if q.requires_grad)
    delta, _ = measure_peak(lambda: run_step(wrapped, small))
    measured = static_bytes(planned_model, small) + grads + delta
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
    for changed, words in (({"loss": "loss_fn"}, r"loss computed outside the model \(loss_fn\)"),
                           ({"optimizer": "adamw"}, "adamw's step")):
        other = dataclasses.replace(p, training_loop=dataclasses.replace(p.training_loop, **changed))
        with pytest.raises(planner.LoopNotResimulated, match=words):
            planner.resimulate(other, None, None, None, num_fwd_outputs=1)  # refused before reading the graphs


def test_one_wrapped_module_alternates_shapes_without_recompiling(residual):
    model, inputs, p = residual
    eager, planned_model = copy.deepcopy(model), copy.deepcopy(model)
    wrapped = runtime.apply(planned_model, p)
    small = _batch(100, seed=3)
    for step, batch in enumerate([inputs, small, inputs, small]):
        for m in (eager, planned_model):
            for q in m.parameters():
                q.grad = None
        _, le = run_step(eager, batch, seed=step)
        _, lp = run_step(wrapped, batch, seed=step)
        torch.testing.assert_close(lp, le)
        for (k, a), (_, b) in zip(eager.named_parameters(), planned_model.named_parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, msg=k)
    assert len(wrapped.compiled_graphs) == 2
    assert {e.how for e in wrapped.shapes.values()} == {"planned", "reused"}


class ShapeBranch(nn.Module):
    """Its graph's structure depends on the batch size (a Python branch on a shape)."""

    def __init__(self, d: int = 32, layers: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        if x.shape[0] < 64:  # small batches take another path
            x = x * torch.sigmoid(x)
        return x.square().mean()


def test_shapes_that_change_the_structure_are_planned_again():
    torch.manual_seed(0)
    model = ShapeBranch()
    x = torch.randn(256, 32)
    with planner.prepare(model, (x,)) as step:  # one capture for both budgets
        full = step.plan(planner.GiB).baseline_peak_bytes
        p = step.plan(int(0.7 * full))
    small = (torch.randn(40, 32),)
    with pytest.warns(runtime.ShapeWarning, match="planning again"):
        wrapped, planned_model = assert_same_step(model, lambda m: runtime.apply(m, p), small)
    entry = wrapped.shapes[json.dumps([["0", [40, 32], "float32"]])]
    assert entry.how == "replanned"
    assert entry.plan.budget_bytes == p.budget_bytes and entry.plan.fingerprint != p.fingerprint
    assert measured_step_peak(wrapped, planned_model, small) <= p.budget_bytes
    # a plan whose budget counts the optimizer step is not re-planned without it
    with_opt = runtime.apply(model, planner.plan(model, 0.9 * full / planner.GiB, (x,), optimizer="sgd"))
    with pytest.raises(runtime.PlanMismatch, match="optimizer step.*plan for these shapes"):
        with_opt(*small)


def test_gpt2_at_a_shorter_sequence_reuses_the_decisions():
    torch.manual_seed(0)
    model = tiny_gpt2(layers=2, d=32, heads=2, vocab=64, positions=64)
    ids = torch.randint(0, 64, (4, 64))
    with planner.prepare(model, {"input_ids": ids, "labels": ids}) as step:  # one capture for both budgets
        full = step.plan(planner.GiB).baseline_peak_bytes
        p = step.plan(int(0.8 * full))
    short = torch.randint(0, 64, (4, 48))
    inputs = {"input_ids": short, "labels": short}
    with warnings.catch_warnings():
        warnings.simplefilter("error", runtime.ShapeWarning)
        wrapped, planned_model = assert_same_step(model, lambda m: runtime.apply(m, p), inputs)
    (entry,) = [e for e in wrapped.shapes.values() if e.how != "planned"]
    assert entry.how == "reused"
    assert measured_step_peak(wrapped, planned_model, inputs) <= p.budget_bytes


class ShapeBreak(nn.Module):
    """Traceable at the planned batch size; small batches reach a print (a graph break)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if x.shape[0] < 8:
            print("tiny batch")
        return h.square().mean()


def test_new_shapes_that_break_the_graph_name_the_line():
    from profiles import GraphBreak

    torch.manual_seed(0)
    model = ShapeBreak()
    p = planner.plan(model, 1.0, (torch.randn(32, 16),))
    wrapped = runtime.apply(model, p)
    with pytest.raises(GraphBreak, match=r"test_shapes.py:\d+ in forward \(`print\(\"tiny batch\"\)`\)"):
        run_step(wrapped, (torch.randn(4, 16),))
    assert all(q.grad is None for q in model.parameters())


def test_per_rank_plans_stay_per_rank_at_new_shapes(residual):
    """A plan made per rank (world_size/sharding/optimizer) is re-simulated with the
    engine's bytes at new sizes, and planned again per rank, under its objective."""
    from planner.distributed import Distributed, engine_bytes

    model, inputs, _ = residual
    ddp = {"world_size": 2, "sharding": "ddp", "optimizer": "adamw"}
    single, ranked = planner.plan(model, 1.0, inputs), planner.plan(model, 1.0, inputs, **ddp)
    assert not single.recomputed and not ranked.recomputed
    small = _batch(100, seed=1)
    peaks = []
    for p in (single, ranked):
        wrapped, _ = assert_same_step(model, lambda m, p=p: runtime.apply(m, p), small)
        peaks.append(wrapped.shapes[_key(small)].predicted_peak_bytes)
    assert peaks[1] - peaks[0] == engine_bytes(model, Distributed(**ddp)).held

    torch.manual_seed(0)
    branchy = ShapeBranch()
    x = torch.randn(256, 32)
    fsdp = {"world_size": 2, "sharding": "fsdp", "optimizer": "adamw"}
    with planner.prepare(branchy, (x,), objective="flops", **fsdp) as step:  # one capture for both budgets
        full = step.plan(planner.GiB).baseline_peak_bytes
        p = step.plan(int(0.9 * full))
    assert p.recomputed
    tiny = (torch.randn(40, 32),)
    with pytest.warns(runtime.ShapeWarning, match="planning again"):
        wrapped, _ = assert_same_step(branchy, lambda m: runtime.apply(m, p), tiny)
    new = wrapped.shapes[json.dumps([["0", [40, 32], "float32"]])].plan
    assert new.distributed == p.distributed and new.solver.objective == "flops"
    assert new.budget_bytes == p.budget_bytes and new.predicted_peak_bytes <= p.budget_bytes
