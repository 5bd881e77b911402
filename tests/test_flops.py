"""FLOPs of a profiled graph: a FLOP formula that raises is reported (a
``FlopCountWarning`` per operator, ``GraphProfile.flop_failures`` per node), not
counted as 0 in silence.

The operator is a real custom op with a FLOP formula registered in torch's own
``flop_registry``; the formula raises for a negative factor.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from profiles import FlopCountWarning, capture, profile_graph
from profiles.nodes import FlopCountError, node_flops


@torch.library.custom_op("planner_test::scaled", mutates_args=())
def scaled(x: torch.Tensor, k: float) -> torch.Tensor:
    return x * k


@scaled.register_fake
def _(x, k):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.k = inputs[1]


def _backward(ctx, grad):
    return grad * ctx.k, None


scaled.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.planner_test.scaled)
def _scaled_flops(x_shape, k, *, out_shape=None, **kwargs) -> int:
    if k < 0:
        raise ValueError("no FLOP formula for a negative factor")
    return math.prod(x_shape)


class Scaled(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.ops.planner_test.scaled(self.a(x), self.k)
        return torch.ops.planner_test.scaled(self.b(h), self.k).square().mean()


def _scaled_nodes(gp):
    return [n for n, info in gp.nodes.items() if info.op == "planner_test.scaled.default"]


def test_a_formula_that_works_is_counted_without_warning():
    joint = capture(Scaled(2.0), torch.randn(4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlopCountWarning)
        gp = profile_graph(joint, target="cpu", measure_temps=False)
    names = _scaled_nodes(gp)
    assert len(names) == 2
    assert all(gp.nodes[n].flops == 4 * 8 for n in names)
    assert gp.flop_failures == {}


def test_a_formula_that_raises_is_reported_once_per_op_with_its_nodes():
    joint = capture(Scaled(-1.0), torch.randn(4, 8))
    with pytest.warns(FlopCountWarning) as caught:
        gp = profile_graph(joint, target="cpu", measure_temps=False)
    names = _scaled_nodes(gp)
    assert len(names) == 2
    assert len(caught) == 1  # one warning for the operator, naming both nodes
    message = str(caught[0].message)
    assert "planner_test.scaled.default" in message and "2 node(s)" in message
    assert all(repr(n) in message for n in names)
    assert "ValueError: no FLOP formula for a negative factor" in message
    assert set(gp.flop_failures) == set(names)
    assert all(gp.nodes[n].flops == 0 for n in names)
    assert sum(info.flops for info in gp.nodes.values()) > 0  # the linear layers' matmuls still count


def test_node_flops_raises_naming_the_op_and_node():
    joint = capture(Scaled(-1.0), torch.randn(4, 8))
    node = next(n for n in joint.gm.graph.nodes if n.target is torch.ops.planner_test.scaled.default)
    with pytest.raises(FlopCountError, match=rf"planner_test\.scaled\.default raised on node {node.name!r}") as err:
        node_flops(node)
    assert err.value.node == node.name and err.value.op == "planner_test.scaled.default"
    assert isinstance(err.value.__cause__, ValueError)
