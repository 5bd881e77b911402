"""Capture: the joint graph's primals are the model's own tensors, named by role.

The capture stops at the partitioner (nothing split, no forward run) when the
backend's inputs are the primals one to one; these tests check that the tensors
it then records are the ones a run of the forward is called with.
"""

from __future__ import annotations

import torch
from torch import nn

from helpers import tiny_gpt2
from profiles import capture
from profiles.executors import _primals_of


class _Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x, scale):
        return (self.net(x) * scale).sum()


def _owner_names(model):
    names = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), name)
    return names


def test_primals_are_the_models_tensors_and_the_inputs():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))
    gpt = tiny_gpt2(layers=1, d=32, heads=2, vocab=64, positions=16)  # tied embedding and head
    joint = capture(gpt, {"input_ids": ids, "labels": ids})  # one tensor passed twice
    names = _owner_names(gpt)
    for value, role, name in zip(joint.primal_values, joint.primal_roles, joint.primal_names):
        if role == "input":
            assert value is ids and name == ""
        else:
            assert names[id(value)] == name
    assert joint.primal_roles.count("input") == 1
    assert sum(r == "param" for r in joint.primal_roles) == len(list(gpt.parameters()))

    net, x, scale = _Norm(), torch.randn(4, 8), torch.randn(())
    before = {k: b.clone() for k, b in net.named_buffers()}
    joint = capture(net, (x, scale))
    assert [v for v, r in zip(joint.primal_values, joint.primal_roles) if r == "input"] == [x, scale]
    assert {n for n, r in zip(joint.primal_names, joint.primal_roles) if r == "buffer"} == set(before)
    assert all(torch.equal(b, before[k]) for k, b in net.named_buffers())  # BatchNorm's statistics untouched


def test_backend_inputs_that_are_not_the_primals_one_to_one_are_not_taken():
    joint = capture(_Norm(), (torch.randn(4, 8), torch.randn(())))
    values = list(joint.primal_values)
    assert _primals_of(joint.raw_gm, values) == values
    assert _primals_of(joint.raw_gm, values[:-1]) is None  # one input merged or deduplicated
    assert _primals_of(joint.raw_gm, values[:-1] + [values[-1].double()]) is None  # another dtype
    assert _primals_of(joint.raw_gm, values[1:] + values[:1]) is None  # another order: shapes differ
    assert _primals_of(joint.raw_gm, None) is None
