"""Bad input gets a clear, typed error before anything runs, and the model loses nothing.

Budgets (ValueError/TypeError, BudgetTooSmall) are covered in test_plan_api.py;
here: inputs the model rejects, graph breaks, plans for another or a changed
model, inconsistent plan files, devices, and eval/no_grad passthrough.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json

import pytest
import torch
from torch import nn

import planner
import runtime
from helpers import run_step
from profiles.capture_errors import DataDependentShape, GraphBreak, InputsRejected


class Small(nn.Module):
    """A tiny MLP; ``act`` picks the activation so two instances share parameters but not the graph."""

    def __init__(self, d: int = 16, act: str = "gelu"):
        super().__init__()
        self.a = nn.Linear(d, 4 * d)
        self.b = nn.Linear(4 * d, d)
        self.act = act

    def forward(self, x):
        h = self.a(x)
        for _ in range(4):
            h = h + (nn.functional.gelu(h) if self.act == "gelu" else torch.relu(h)).tanh()
        return self.b(h).square().mean()


class Branchy(Small):
    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent Python branch
            h = h * 2
        return self.b(h).square().mean()


class ItemBranchy(Small):
    def forward(self, x):
        h = self.a(x)
        if h.sum().item() > 0:  # a branch on a Python number read from a tensor
            h = h * 2
        return self.b(h).square().mean()


class Chatty(Small):
    def forward(self, x):
        h = self.a(x)
        print("shape", h.shape)
        return self.b(h).square().mean()


class Masky(Small):
    def forward(self, x):
        h = self.a(x)
        h = h[h.sum(-1) > 0]  # as many rows as the data says
        return self.b(h).square().mean()


def _line_of(cls, needle: str) -> int:
    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(lines) if needle in line)


@pytest.fixture(scope="module")
def small_plan():
    torch.manual_seed(0)
    model = Small()
    x = torch.randn(512, 16)
    with planner.prepare(model, (x,)) as step:  # one capture for both budgets
        p = step.plan(int(0.8 * step.plan(planner.GiB).baseline_peak_bytes))
    assert p.recomputed, "the fixture should recompute something"
    return model, x, p


def test_inputs_the_model_rejects_give_its_own_error_and_the_shapes_tried():
    model = nn.Linear(8, 8)
    with pytest.raises(InputsRejected) as info:
        planner.plan(model, 1.0, (torch.randn(4, 7),))
    e = info.value
    assert isinstance(e, ValueError)
    assert isinstance(e.__cause__, RuntimeError) and e.error is e.__cause__
    assert "mat1 and mat2" in str(e.__cause__)  # the model's own words, from an eager call
    assert "#0: 4x7 float32" in str(e) and "mat1 and mat2" in str(e)
    assert e.inputs == [["0", [4, 7], "float32"]]
    with pytest.raises(InputsRejected, match=r"'x': 3x8 float32"):
        planner.plan(Small(d=16), 1.0, {"x": torch.randn(3, 8)})


@pytest.mark.parametrize(
    "cls, needle, words",
    [(Branchy, "if h.sum() > 0", "Data-dependent branching"),
     (ItemBranchy, "if h.sum().item() > 0", "Data-dependent branching"),
     (Chatty, "print(", "print")],
)
def test_graph_break_names_file_line_and_what_to_change(cls, needle, words):
    """Planned for Inductor, a graph break is an error (op by op, it is a region boundary: test_regions.py)."""
    model = cls()
    with pytest.raises(GraphBreak) as info:
        planner.plan(model, 1.0, (torch.randn(4, 16),), executor="inductor")
    e = info.value
    line = _line_of(cls, needle)
    assert e.file == __file__ and e.line == line
    msg = str(e)
    assert f"{__file__}:{line}" in msg and needle in msg and words in msg
    assert "change that line" in msg


def test_data_dependent_shape_names_file_and_line():
    with pytest.raises(DataDependentShape) as info:
        planner.plan(Masky(), 1.0, (torch.randn(8, 16),))
    e = info.value
    line = _line_of(Masky, "h = h[h.sum(-1) > 0]")
    assert (e.file, e.line) == (__file__, line)
    assert f"{__file__}:{line}" in str(e) and "torch.where" in str(e)


def test_model_state_is_untouched_by_a_failed_capture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    x = torch.randn(4, 5)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    with pytest.raises(InputsRejected):
        planner.plan(model, 1.0, (x,))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_plan_for_a_model_with_other_parameters_is_refused_at_apply(small_plan):
    _, _, p = small_plan
    with pytest.raises(runtime.PlanMismatch, match=r"'a.weight' has shape \[128, 16\], the planned model's has \[64, 16\]"):
        runtime.apply(_wider(), p)
    frozen = Small()
    frozen.a.weight.requires_grad_(False)
    with pytest.raises(runtime.PlanMismatch, match="'a.weight' has requires_grad False"):
        runtime.apply(frozen, p)
    with pytest.raises(runtime.PlanMismatch, match="parameter #0 is '0.weight'"):
        runtime.apply(nn.Sequential(nn.Linear(16, 64)), p)


def _wider():
    m = Small()
    m.a = nn.Linear(16, 128)
    m.b = nn.Linear(128, 16)
    return m


def test_plan_for_a_changed_forward_names_the_first_differing_node(small_plan):
    model, x, p = small_plan
    changed = Small(act="relu")
    changed.load_state_dict(model.state_dict())
    wrapped = runtime.apply(changed, p)  # same parameters: accepted until the graph is seen
    with pytest.raises(runtime.PlanMismatch) as info:
        run_step(wrapped, (x,))
    msg = str(info.value)
    assert "first differing node" in msg and "'relu'" in msg and "aten.relu.default" in msg, msg
    assert changed.a.weight.grad is None  # nothing ran


def test_inconsistent_plan_files_are_refused_before_anything_runs(small_plan):
    _, _, p = small_plan
    data = json.loads(p.to_json())

    def edited(fn):
        d = copy.deepcopy(data)
        fn(d)
        return json.dumps(d)

    rec = next(n for n in data["nodes"] if n["decision"] == "recompute" and n["inputs"])
    dep = rec["inputs"][0]

    def drop_input(d):
        d["nodes"] = [n for n in d["nodes"] if n["name"] != dep]

    with pytest.raises(ValueError, match=f"node '{rec['name']}' is recomputed but its input '{dep}' is neither saved nor recomputed"):
        planner.Plan.from_json(edited(drop_input))
    cases = {
        "budget_bytes must be a non-negative integer": lambda d: d.update(budget_bytes="lots"),
        "appears twice": lambda d: d["nodes"].append(d["nodes"][0]),
        "has bytes -5": lambda d: d["nodes"][0].update(bytes=-5),
        "dropout is 'sometimes'": lambda d: d.update(dropout="sometimes"),
        "'inputs' must be a list of node names": lambda d: d["nodes"][0].update(inputs="addmm"),
        "malformed plan JSON: KeyError": lambda d: d.pop("solver"),
        "malformed plan JSON: TypeError": lambda d: d["nodes"][0].update(colour="red"),
    }
    for words, fn in cases.items():
        with pytest.raises(ValueError, match=words):
            planner.Plan.from_json(edited(fn))
    # a Plan edited in code is checked by apply before anything runs
    nodes = tuple(n for n in p.nodes if n.name != dep)
    with pytest.raises(ValueError, match="neither saved nor recomputed"):
        runtime.apply(Small(), dataclasses.replace(p, nodes=nodes))


def test_version_1_plans_are_still_read(small_plan):
    _, _, p = small_plan
    d = json.loads(p.to_json())
    d["schema_version"] = 1
    for n in d["nodes"]:
        del n["inputs"]
    for k in ("structure", "graph", "parameters"):
        del d["model"][k]
    old = planner.Plan.from_json(json.dumps(d))
    assert old.recomputed == p.recomputed and all(n.inputs == () for n in old.nodes)
    # the model entries it lacks are not recorded, and are not written back
    assert (old.model.structure, old.model.graph, old.model.parameters) == (None, None, None)
    assert old.model.class_name == "Small" and old.to_dict()["model"] == d["model"]
    runtime.apply(Small(), old)  # no parameters recorded: nothing to refuse
    with pytest.raises(ValueError, match="schema version 0 is not supported"):
        planner.Plan.from_json(json.dumps({**d, "schema_version": 0}))


def test_target_of_another_device_kind_is_refused(small_plan):
    model, x, p = small_plan
    with pytest.raises(ValueError, match="target 'h100' is a GPU profile but the model is on cpu"):
        planner.plan(model, 1.0, (x,), target="h100")
    gpu_plan = dataclasses.replace(p, target="h100")
    with pytest.raises(runtime.PlanMismatch, match="made for target 'h100' but the model is on cpu"):
        runtime.apply(copy.deepcopy(model), gpu_plan)


def test_inputs_on_another_device_than_the_parameters(small_plan):
    """A training step refuses inputs on another device than the parameters. (Only the
    meta device differs from the CPU on this machine, and planning accepts meta inputs:
    that is planning without memory, profiles.meta; cpu/cuda mixes need a GPU to test.)"""
    model, x, p = small_plan
    elsewhere = torch.empty(512, 16, device="meta")
    wrapped = runtime.apply(copy.deepcopy(model), p)
    with pytest.raises(ValueError, match=r"input #0 is on meta but the model's parameters are on cpu; move the inputs"):
        wrapped(elsewhere)
    with pytest.raises(ValueError, match=r"input 'x' is on meta"):
        wrapped(x=elsewhere)
    assert wrapped.compiled_graphs == []


@pytest.mark.filterwarnings("ignore::planner.LossNotCountedWarning")  # the model's output is not a loss; the loss is not what this tests
def test_eval_and_no_grad_run_the_original_model_without_planning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4))
    x = torch.randn(64, 16)
    p = planner.plan(model, 1.0, (x,))
    wrapped = runtime.apply(model, p)
    with torch.no_grad():  # training mode, no gradients: dropout as the original draws it
        torch.manual_seed(1)
        got = wrapped(x)
        torch.manual_seed(1)
        want = model(x)
    assert torch.equal(got, want)
    wrapped.eval()
    assert not model.training
    got = wrapped(x)  # eval with gradients enabled
    assert torch.equal(got, model(x)) and got.requires_grad
    assert wrapped.compiled_graphs == [], "eval/no_grad must not compile or plan"
