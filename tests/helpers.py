"""Shared test helpers: small models, one training step, measured peaks."""

from __future__ import annotations

import copy

import torch
from torch import nn

from profiles import measure_peak, storage_bytes

__all__ = ["ResidualNet", "TiedNet", "BreakyLM", "run_step", "measured_step_peak", "grads_of", "assert_same_step",
           "tiny_gpt2"]


class ResidualNet(nn.Module):
    """Residual MLP blocks with dropout, BatchNorm, an in-place op and a frozen layer."""

    def __init__(self, d: int = 64, blocks: int = 4, hidden: int = 256, p: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.inp.weight.requires_grad_(False)  # frozen
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(p), nn.Linear(hidden, d)) for _ in range(blocks)
        )
        self.norm = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, 8)

    def forward(self, x, target=None):
        h = self.inp(x)
        for blk in self.blocks:
            y = blk(h)
            y.mul_(0.5)  # in-place op in user code
            h = h + y
        h = self.norm(h)
        logits = self.head(h)
        out = {"logits": logits}
        if target is not None:
            out["loss"] = nn.functional.cross_entropy(logits, target)
        return out


class TiedNet(nn.Module):
    """Embedding and output projection share one weight."""

    def __init__(self, vocab: int = 200, d: int = 64, layers: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d)) for _ in range(layers))
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h).float().logsumexp(-1).mean()


class _LMBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln(x))))


class BreakyLM(nn.Module):
    """A language model that breaks the graph, called as Hugging Face models are
    (``model(input_ids=..., labels=..., num_items_in_batch=...)``, a dict with ``loss``
    and ``logits`` back): three blocks, a ``print`` after the first and a branch on a
    tensor (always taken) after the second, so ``torch.compile`` runs it as three regions.
    With ``num_items_in_batch`` (the Trainer's count of labelled tokens in the whole
    accumulation window) the loss is the summed cross-entropy over it."""

    def __init__(self, vocab: int = 64, d: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.b1, self.b2, self.b3 = _LMBlock(d), _LMBlock(d), _LMBlock(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
        h = self.b1(self.emb(input_ids))
        print("between blocks")
        h = self.b2(h)
        if h.abs().sum() > 0:
            h = h * 2
        logits = self.head(self.b3(h))
        out = {"logits": logits}
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                               reduction="mean" if num_items_in_batch is None else "sum")
            out["loss"] = loss if num_items_in_batch is None else loss / num_items_in_batch
        return out


def tiny_gpt2(layers: int = 2, d: int = 64, heads: int = 4, vocab: int = 128, positions: int = 64):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=positions)
    return transformers.GPT2LMHeadModel(cfg)


def _loss(out):
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.float().square().mean()
    if isinstance(out, dict) or hasattr(out, "keys"):
        if out.get("loss") is not None:
            return out["loss"]
        return out["logits"].float().square().mean()
    raise TypeError(type(out))


def _call(module, inputs):
    if isinstance(inputs, dict):
        return module(**inputs)
    return module(*inputs)


def run_step(module, inputs, *, seed: int = 0):
    """One training step: seeded forward, loss, backward. Returns (outputs, loss)."""
    torch.manual_seed(seed)
    out = _call(module, inputs)
    loss = _loss(out)
    loss.backward()
    return out, loss.detach()


def grads_of(model) -> dict[str, torch.Tensor | None]:
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def static_bytes(model, inputs) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    return storage_bytes(tensors)


def measured_step_peak(module, model, inputs, *, seed: int = 0) -> int:
    """Absolute peak bytes of one step: live parameters/buffers/inputs plus the
    profiler-measured peak above them. Gradients are cleared first."""
    for p in model.parameters():
        p.grad = None
    delta, _ = measure_peak(lambda: run_step(module, inputs, seed=seed))
    for p in model.parameters():
        p.grad = None
    return static_bytes(model, inputs) + delta


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "keys"):
        return [v for k, v in out.items() if isinstance(v, torch.Tensor)]
    return [t for t in out if isinstance(t, torch.Tensor)]


def assert_same_step(model, wrapped_factory, inputs, *, seed: int = 0, rtol=1e-5, atol=1e-6):
    """Run one step eagerly on a copy of ``model`` and one with ``wrapped_factory(copy)``;
    outputs, loss, gradients and buffers must agree."""
    eager = copy.deepcopy(model)
    planned_model = copy.deepcopy(model)
    wrapped = wrapped_factory(planned_model)
    out_e, loss_e = run_step(eager, inputs, seed=seed)
    out_p, loss_p = run_step(wrapped, inputs, seed=seed)
    torch.testing.assert_close(loss_p, loss_e, rtol=rtol, atol=atol)
    for a, b in zip(_flat(out_p), _flat(out_e)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    ge, gp = grads_of(eager), grads_of(planned_model)
    assert ge.keys() == gp.keys()
    for k in ge:
        if ge[k] is None:
            assert gp[k] is None, f"{k}: eager has no gradient, planned has one"
        else:
            assert gp[k] is not None, f"{k}: planned has no gradient"
            torch.testing.assert_close(gp[k], ge[k], rtol=rtol, atol=atol, msg=lambda m: f"grad of {k}: {m}")
    for (k, be), (_, bp) in zip(eager.named_buffers(), planned_model.named_buffers()):
        torch.testing.assert_close(bp, be, rtol=rtol, atol=atol, msg=lambda m: f"buffer {k}: {m}")
    return wrapped, planned_model
