"""The fast schedule the solvers simulate is the schedule of the graphs that run."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from helpers import ResidualNet, tiny_gpt2
from planner.problem import build_problem
from planner.joint_index import fast_schedule
from planner.schedule import schedule_of
from planner.simulate import simulate
from planner.sqrt import solve_sqrt
from profiles import capture, profile_graph
from runtime.partition import PlanInfeasible, split_joint


def _cases():
    torch.manual_seed(0)
    yield "residual", ResidualNet(d=32, blocks=3, hidden=64), {"x": torch.randn(64, 32), "target": torch.randint(0, 8, (64,))}
    ids = torch.randint(0, 128, (4, 64))
    yield "gpt2", tiny_gpt2(layers=2, d=64, heads=4, vocab=128, positions=64), {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("mode", ["mask", "replay"])
@pytest.mark.parametrize("case", ["residual", "gpt2"])
def test_fast_schedule_matches_split(case, mode):
    name, model, inputs = next(c for c in _cases() if c[0] == case)
    joint = capture(model, inputs, dropout=mode)
    gp = profile_graph(joint, measure_temps=False)
    prob = build_problem(gp)
    sets = {
        "nothing": frozenset(),
        "everything": frozenset(prob.can_recompute),
        "sqrt": solve_sqrt(prob, None).evaluation.recompute,
    }
    for label, recompute in sets.items():
        fwd, bwd, _ = split_joint(joint, recompute)
        real, fast = schedule_of(fwd, bwd), fast_schedule(joint, recompute)
        assert fast == real, f"{case}/{mode}/{label}: schedules differ"
        assert simulate(gp, fast).peak_bytes == simulate(gp, real).peak_bytes


def test_split_names_a_gradient_the_saved_values_cannot_produce():
    """A gradient that needs a forward value nobody saves or recomputes is refused
    before the graphs are built, with the gradient's name."""
    g = fx.Graph()
    x = g.placeholder("primals_1")
    g.placeholder("tangents_1")
    out = g.call_function(torch.ops.aten.sin.default, (x,))
    grad = g.call_function(torch.ops.aten.cos.default, (x,))  # read by no backward node: never saved
    g.output([out, grad])
    with pytest.raises(PlanInfeasible, match="gradient cos"):
        split_joint(fx.GraphModule(torch.nn.Module(), g), frozenset(), num_fwd_outputs=1)
