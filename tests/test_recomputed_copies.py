"""A value backward recomputes while forward's buffer of it is still live (a model
output the caller holds) gets a buffer of its own: the simulator charges both,
as the step allocates both."""

from __future__ import annotations

import copy

import torch
from torch import nn

import runtime
from helpers import measured_step_peak
from planner import ModelInfo, SolverInfo
from planner.build import build_plan
from planner.problem import build_problem
from profiles import capture, profile_graph

D, ROWS = 64, 128


class NormOut(nn.Module):
    """A layer norm whose output the caller holds and the next layer reads; its
    backward reads the norm's mean and rstd, last."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        h = self.norm(self.inp(x))
        return {"loss": self.mlp(h).square().mean(), "hidden": h}


def test_a_recomputed_held_output_is_a_second_buffer():
    torch.manual_seed(0)
    model, inputs = NormOut(), (torch.randn(ROWS, D),)
    gp = profile_graph(capture(copy.deepcopy(model), inputs, dropout="mask"))
    prob = build_problem(gp)
    # everything recomputed: the norm (for its mean and rstd, which its backward reads
    # last) runs again early in backward, for the first layer's weight gradient
    ev, baseline = prob.evaluate(prob.can_recompute), prob.evaluate(frozenset())
    assert "native_layer_norm" in ev.recomputed
    p = build_plan(prob, ev, baseline=baseline, budget_bytes=ev.sim.peak_bytes,
                   solver=SolverInfo(name="none", status="test", seconds=0.0),
                   model_info=ModelInfo(fingerprint=gp.joint.fingerprint))
    planned = copy.deepcopy(model)
    measured = measured_step_peak(runtime.apply(planned, p), planned, inputs)
    # 64 B: the loss's and autograd's few-byte scalars outside the step's graphs
    assert p.predicted_peak_bytes - 64 <= measured <= p.predicted_peak_bytes + 64, (measured, p.predicted_peak_bytes)
