"""profiles.batch_norm_stats: training-mode BatchNorm backward is not handed the new
running statistics it does not read, so forward saves what eager autograd saves; the
step is bit-equal to eager's, statistics updated once."""

from __future__ import annotations

import copy

import torch
from torch import nn

import planner
import runtime
from helpers import assert_same_step, measured_step_peak
from profiles import capture


class _Net(nn.Module):
    """BatchNorm between linear layers; the loss inside, so the step ends at backward."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 512),
                                  nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.body(x), y)


def test_batch_norm_backward_reads_no_running_statistics_and_the_step_keeps_what_eager_keeps():
    torch.manual_seed(0)
    model = _Net().train()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g))
    joint = capture(model, inputs)
    backward = joint.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.native_batch_norm_backward.default)
    assert len(backward) == 2 and all(n.args[3] is None and n.args[4] is None for n in backward)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        copy.deepcopy(model)(*inputs)
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *inputs]}
    eager_saved = sum(s.nbytes() for s in {t.untyped_storage().data_ptr(): t.untyped_storage() for t in saved}.values()
                      if s.data_ptr() not in static)
    del saved
    p = planner.plan(model, 1.0, inputs)
    kept = sum(d.bytes for d in p.nodes if d.decision == "save")
    assert kept <= eager_saved, (kept, eager_saved)
    probe = copy.deepcopy(model)
    eager_peak = measured_step_peak(probe, probe, inputs)
    wrapped, planned = assert_same_step(model, lambda m: runtime.apply(m, p), inputs, rtol=0, atol=0)
    assert measured_step_peak(wrapped, planned, inputs) <= min(eager_peak, p.predicted_peak_bytes + 64)
