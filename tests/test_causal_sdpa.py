"""profiles.causal_sdpa: traced attention runs as eager runs it (``is_causal``, grouped
key/value heads), so the no-checkpoint step keeps no more than eager and computes the same
numbers; masks that are not the constant causal one are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import planner
import runtime
from helpers import grads_of, measured_step_peak, run_step
from profiles.causal_sdpa import restore_causal_sdpa

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

IDS = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))


def _logits_loss(out):
    """The loss ``helpers.run_step`` computes from outputs that carry none."""
    return out["logits"].float().square().mean()


def _mistral():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=128, vocab_size=128, use_cache=False)
    return transformers.MistralForCausalLM(cfg)


def _attention_calls(wrapped):
    """(key's head count, is_causal, whether a mask is passed) of each attention kernel the
    planned module's forward graph runs."""
    fwd, _ = wrapped.compiled_graphs[-1]
    calls = []
    for n in fwd.graph.find_nodes(op="call_function", target=torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default):
        is_causal = n.args[4] if len(n.args) > 4 else n.kwargs.get("is_causal", False)
        calls.append((n.args[1].meta["val"].shape[1], is_causal, n.kwargs.get("attn_mask") is not None))
    return calls


def _same_step_as_eager(model, inputs):
    """The no-checkpoint plan applied to a copy of ``model``, after one step of it and one
    of eager on another copy with bit-equal loss, logits and gradients; and the eager copy."""
    plan = planner.plan(copy.deepcopy(model), 100.0, inputs, loss_fn=_logits_loss)
    eager, planned = copy.deepcopy(model), copy.deepcopy(model)
    wrapped = runtime.apply(planned, plan)
    (out_e, loss_e), (out_p, loss_p) = run_step(eager, inputs), run_step(wrapped, inputs)
    assert torch.equal(loss_p, loss_e) and torch.equal(out_p.logits, out_e.logits)
    ge, gp = grads_of(eager), grads_of(planned)
    assert [k for k in ge if not torch.equal(gp[k], ge[k])] == []
    return plan, wrapped, planned, eager


def test_causal_attention_keeps_no_more_than_eager():
    inputs = {"input_ids": IDS}  # the loss outside: AOTAutograd materialises no zero gradient of the logits
    plan, wrapped, planned, eager = _same_step_as_eager(_mistral(), inputs)
    assert _attention_calls(wrapped) == [(2, True, False)]  # the kv heads unrepeated, no mask
    eager_peak = measured_step_peak(eager, eager, inputs)
    assert plan.predicted_peak_bytes <= eager_peak, (plan.predicted_peak_bytes, eager_peak)
    measured = measured_step_peak(wrapped, planned, inputs)
    assert measured <= eager_peak, (measured, eager_peak)


def _compiled_counting(model, counts):
    """``model`` compiled with a backend that records how many attention calls
    :func:`restore_causal_sdpa` rewrites, then runs the graph as it is (autograd's backward)."""

    def backend(gm, example_inputs):
        counts.append(restore_causal_sdpa(gm))
        return gm

    torch.compiler.reset()
    return torch.compile(model, backend=backend, fullgraph=True)


def test_padding_mask_is_left_alone():
    mask = torch.ones_like(IDS)
    mask[0, :5] = 0
    inputs = {"input_ids": IDS, "attention_mask": mask}
    model = _mistral()
    eager, traced = copy.deepcopy(model), copy.deepcopy(model)
    counts = []
    (out_e, loss_e), (out_t, loss_t) = run_step(eager, inputs), run_step(_compiled_counting(traced, counts), inputs)
    assert counts == [0]  # the mask depends on the input: not rewritten
    assert torch.equal(loss_t, loss_e) and torch.equal(out_t.logits, out_e.logits)
    ge, gt = grads_of(eager), grads_of(traced)
    assert [k for k in ge if not torch.equal(gt[k], ge[k])] == []


class _Masked(torch.nn.Module):
    """Attention under a constant mask built in forward: ``tril(diagonal)``, its transpose,
    or ``tril()`` with one entry then cleared in place."""

    def __init__(self, diagonal: int = 0, transpose: bool = False, written: bool = False):
        super().__init__()
        self.diagonal, self.transpose, self.written = diagonal, transpose, written

    def forward(self, q, k, v):
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(self.diagonal)
        if self.written:
            mask[-1, 0] = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.T if self.transpose else mask)


@pytest.mark.parametrize("kind, rewritten", [({}, 1), ({"diagonal": -1}, 0), ({"transpose": True}, 0), ({"written": True}, 0)])
def test_only_the_causal_mask_is_rewritten(kind, rewritten):
    q, k, v = (torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    model = _Masked(**kind)
    counts = []
    out = _compiled_counting(model, counts)(q, k, v)
    assert counts == [rewritten]
    torch.testing.assert_close(out, model(q, k, v), rtol=0, atol=1e-6)
