"""planner.zero_tangents and runtime.zero_grads: a model that returns its loss trains
without the zero gradients AOTAutograd would make for its other outputs.

A language model returning its loss and logits, trained with ``out.loss.backward()``:
the planned no-checkpoint step measures its prediction and at most eager's peak, so a
budget of eager's peak recomputes nothing; losses and gradients are bit-equal to
eager's. A step that also backpropagates through the logits (against the plan's
assumption) still gets eager's gradients, and a tangent with another use than an
``add`` receives the zeros the engine would make.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

import planner
import runtime
from helpers import grads_of, measured_step_peak, run_step
from planner.zero_tangents import skippable_tangents, without_zero_tangents
from profiles import capture, profile_graph
from runtime.zero_grads import accept_missing_tangents, zeros_if_none

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _mistral():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=128, vocab_size=512, use_cache=False)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    return transformers.MistralForCausalLM(cfg).train(), {"input_ids": ids, "labels": ids}


def _assert_bit_equal(planned, eager, loss_p, loss_e):
    assert torch.equal(loss_p, loss_e)
    ge, gp = grads_of(eager), grads_of(planned)
    assert [k for k in ge if not torch.equal(gp[k], ge[k])] == []


def test_the_logits_tangent_is_skipped_and_the_step_stays_at_or_below_eager():
    model, inputs = _mistral()
    joint = capture(model, inputs)
    skippable = skippable_tangents(joint.gm)
    ((tangent, (add, other, alias)),) = skippable.items()  # the logits' gradient, added to the loss's
    logits = joint.gm.graph.find_nodes(op="placeholder")
    assert [n for n in logits if n.name == tangent][0].meta["val"].shape == (2, 32, 512)
    gp = profile_graph(joint)
    skipped = without_zero_tangents(gp, skippable)
    assert alias and skipped.nodes[tangent].storages == () and skipped.nodes[add].storages == gp.nodes[other].storages

    probe = copy.deepcopy(model)
    eager_peak = measured_step_peak(probe, probe, inputs)
    p = planner.plan(model, eager_peak / planner.GiB, inputs)
    assert p.training_loop.loss == "model" and p.recomputed == []
    assert p.baseline_peak_bytes < eager_peak, (p.baseline_peak_bytes, eager_peak)
    eager, planned = copy.deepcopy(model), copy.deepcopy(model)
    wrapped = runtime.apply(planned, p)
    (_, loss_e), (_, loss_p) = run_step(eager, inputs), run_step(wrapped, inputs)
    _assert_bit_equal(planned, eager, loss_p, loss_e)
    (_, bwd), = wrapped.compiled_graphs
    assert [n.name for n in bwd.graph.nodes if n.op == "call_function" and n.target.__name__ == "add_unless_none"] == [add]
    measured = measured_step_peak(wrapped, planned, inputs)
    # the prediction to 64 B (allocator events outside the step's graphs), below eager
    assert p.predicted_peak_bytes <= measured <= p.predicted_peak_bytes + 64 and measured < eager_peak


def test_a_step_that_also_backpropagates_through_the_logits_gets_eagers_gradients():
    """The plan assumes ``out.loss.backward()``; a loop that also sends a gradient into
    the logits gets it added, as eager does."""
    model, inputs = _mistral()
    p = planner.plan(model, 1.0, inputs)
    eager, planned = copy.deepcopy(model), copy.deepcopy(model)
    wrapped = runtime.apply(planned, p)
    losses = []
    for m in (eager, wrapped):
        out = m(**inputs)
        loss = out.loss + out.logits.float().square().mean()
        loss.backward()
        losses.append(loss.detach())
    _assert_bit_equal(planned, eager, losses[1], losses[0])


def test_a_missing_tangent_with_another_use_becomes_zeros():
    graph = fx.Graph()
    saved, tangent = graph.placeholder("saved"), graph.placeholder("tangents_1")
    tangent.meta["val"] = torch.empty(4, 3)
    graph.output((graph.call_function(torch.ops.aten.mul.Tensor, (tangent, saved)),))
    bwd = accept_missing_tangents(fx.GraphModule(torch.nn.Module(), graph), {})
    assert [n.target for n in bwd.graph.nodes if n.op == "call_function"][0] is zeros_if_none
    x = torch.randn(4, 3)
    assert torch.equal(bwd(x, None)[0], torch.zeros(4, 3))
    g = torch.randn(4, 3)
    assert torch.equal(bwd(x, g)[0], g * x)


def test_a_missing_tangent_added_to_another_layout_gives_a_copy_in_the_sums_layout():
    """``add(tangent, x)`` whose sum is laid out otherwise than ``x`` (a transposed
    gradient): with the tangent missing, the step gets ``x``'s values in the sum's
    strides, as a new buffer; with it, the sum."""
    graph = fx.Graph()
    x, tangent = graph.placeholder("x"), graph.placeholder("tangents_1")
    tangent.meta["val"] = torch.empty(4, 3)
    t = graph.call_function(torch.ops.aten.t.default, (x,))
    add = graph.call_function(torch.ops.aten.add.Tensor, (tangent, t))
    add.meta["val"] = torch.empty(4, 3)
    graph.output((add,))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    t.meta["val"] = torch.empty(3, 4).t()
    assert skippable_tangents(gm) == {"tangents_1": (add.name, t.name, False)}
    bwd = accept_missing_tangents(gm, skippable_tangents(gm))
    base = torch.randn(3, 4)
    got = bwd(base, None)[0]
    assert got.stride() == (3, 1) and torch.equal(got, base.t()) and got.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    g = torch.randn(4, 3)
    assert torch.equal(bwd(base, g)[0], g + base.t())
