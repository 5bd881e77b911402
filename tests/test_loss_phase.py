"""planner.loss_phase against the measured memory of losses run eagerly on real model outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from planner.loss_phase import LossPhase, capture_loss, loss_timeline
from profiles import measure_peak, profile_graph, storage_bytes

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

IDS = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(1))


def _gpt2(dtype):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=300, n_positions=64, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def _llama(dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=128, vocab_size=300, max_position_embeddings=64, use_cache=False)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _z_loss(out):
    """Cross-entropy plus a z-loss, with Python locals alive until it returns."""
    logits = out.logits.float()
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, IDS.unsqueeze(-1)).squeeze(-1)
    z = logits.logsumexp(-1).pow(2)
    return nll.mean() + 1e-4 * z.mean()


LOSSES = {
    "pow": lambda out: out.logits.float().pow(2).mean(),
    "ce": lambda out: F.cross_entropy(out.logits.float().flatten(0, 1), IDS.flatten()),
    "shifted-ce": lambda out: F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), IDS[:, 1:].flatten()),
    "smoothed-ce": lambda out: F.cross_entropy(out.logits.float().flatten(0, 1), IDS.flatten(), label_smoothing=0.1),
    "two-uses": lambda out: out.logits.float().pow(2).mean() + out.logits.float().abs().mean(),
    "z-loss": _z_loss,
}


#: What eager holds beyond the liveness model: an argument of a composite loss (the
#: fp32 copy of bf16 logits passed to cross_entropy) lives until the call returns,
#: across nll_loss's two scalars (8 bytes) and label smoothing's per-token sums
#: (3,600 bytes here); a scalar may also die 8 bytes earlier than modelled.
_SLACK = 4096


def _measured(loss_fn, outputs):
    """(forward peak, backward peak above its start, output-gradient bytes) of
    ``loss_fn(outputs).backward()`` run eagerly on detached outputs."""
    leaf = outputs.logits.detach().requires_grad_(True)
    forward_peak, loss = measure_peak(lambda: loss_fn(type(outputs)(logits=leaf)))
    backward_peak, _ = measure_peak(loss.backward)
    grads = storage_bytes([leaf.grad])
    return forward_peak, backward_peak, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_eager_liveness_equals_measured(loss_name, make, dtype):
    loss_fn = LOSSES[loss_name]
    with torch.no_grad():
        outputs = make(dtype)(input_ids=IDS)
    outputs.logits.requires_grad_(True)
    phase = loss_timeline(profile_graph(capture_loss(loss_fn, outputs)))
    forward_peak, backward_peak, grads = _measured(loss_fn, outputs)
    forward = [b for p, _, b in phase.points if p == "loss forward"]
    backward = [b for p, _, b in phase.points if p == "loss backward"]
    assert abs(forward_peak - max(forward)) <= _SLACK
    assert abs(backward_peak - (max(backward) - phase.saved_bytes)) <= _SLACK
    assert phase.grad_bytes == grads == outputs.logits.numel() * outputs.logits.element_size()


def test_the_pow_loss_holds_four_logits_at_once():
    """``PowBackward0`` keeps ``self.pow(1)``, ``2 * that`` and the product while the
    incoming gradient (``MeanBackward0``'s, logits-sized) is alive: four copies, and
    the loss and its seed gradient (4 bytes each). Measured the same."""
    with torch.no_grad():
        outputs = _gpt2(torch.float32)(input_ids=IDS)
    outputs.logits.requires_grad_(True)
    phase = loss_timeline(profile_graph(capture_loss(LOSSES["pow"], outputs)))
    assert isinstance(phase, LossPhase)
    assert phase.peak_bytes == 4 * outputs.logits.numel() * 4 + 8
    forward_peak, backward_peak, _ = _measured(LOSSES["pow"], outputs)
    assert phase.saved_bytes + backward_peak == phase.peak_bytes


def test_a_loss_that_is_not_reduced_is_refused():
    with torch.no_grad():
        outputs = _gpt2(torch.float32)(input_ids=IDS)
    outputs.logits.requires_grad_(True)
    with pytest.raises(TypeError, match=r"one-element tensor.*\.mean\(\)"):
        capture_loss(lambda out: out.logits.pow(2), outputs)
