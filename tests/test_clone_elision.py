"""profiles.clone_elision: copies eager does not make (``dropout`` with ``p=0`` traced as
``clone``) are read as the value they copy, the profile naming the value's storage
for the copy's views; copies a caller could see are kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

import planner
import runtime
from helpers import assert_same_step, measured_step_peak
from profiles import capture
from profiles._torch_private import storage_key
from profiles.clone_elision import drop_same_layout_clones

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def test_attention_dropout_of_zero_saves_no_copy_and_the_step_stays_below_eager():
    """Llama with eager attention and ``attention_dropout=0.0``: eager's dropout returns the
    attention probabilities, the traced one copies them (and the matmul after it saved the
    copy, the softmax the original). Without the copy the no-checkpoint step measures its
    prediction, below eager's peak, with bit-equal gradients."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=256, use_cache=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    joint = capture(model, inputs)
    copies = [n for n in joint.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.clone.default)
              if not n.kwargs and n.args[0].op == "call_function" and not any(u.op == "output" for u in n.users)]
    assert copies == []
    probe = copy.deepcopy(model)
    eager_peak = measured_step_peak(probe, probe, inputs)
    p = planner.plan(model, 1.0, inputs)
    wrapped, planned = assert_same_step(model, lambda m: runtime.apply(m, p), inputs, rtol=0, atol=0)
    measured = measured_step_peak(wrapped, planned, inputs)
    assert p.predicted_peak_bytes <= measured <= p.predicted_peak_bytes + 64 and measured < eager_peak, (measured, eager_peak)


def _graph(view_is_output: bool) -> fx.GraphModule:
    """x -> relu -> clone -> t -> (an output, or mul), real tensors as ``meta["val"]``."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.randn(4, 3)
    r = graph.call_function(torch.ops.aten.relu.default, (x,))
    r.meta["val"] = torch.relu(x.meta["val"])
    c = graph.call_function(torch.ops.aten.clone.default, (r,))
    c.meta["val"] = r.meta["val"].clone()
    v = graph.call_function(torch.ops.aten.t.default, (c,))
    v.meta["val"] = c.meta["val"].t()
    if view_is_output:
        graph.output((v, r))
    else:
        m = graph.call_function(torch.ops.aten.mul.Tensor, (v, 2.0))
        m.meta["val"] = v.meta["val"] * 2
        graph.output((m,))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_a_copy_an_output_aliases_is_kept_and_views_of_a_dropped_one_name_its_value():
    kept = _graph(view_is_output=True)
    assert drop_same_layout_clones(kept) == 0
    gm = _graph(view_is_output=False)
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    assert drop_same_layout_clones(gm) == 1
    view = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.t.default)
    assert view.args[0] is relu and view.meta["storage_keys"] == [storage_key(relu.meta["val"])]
    x = torch.randn(4, 3)
    assert torch.equal(gm(x)[0], torch.relu(x).t() * 2)
