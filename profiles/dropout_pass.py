"""Make dropout's output recomputable, in one of two ways.

``native_dropout(x, p, train)`` returns ``(out, mask)`` with ``out = x * mask * scale``.
Running it again in backward would draw a new mask, so the op itself is never
recomputed. Two rewrites of the joint graph make ``out`` a deterministic function:

``"mask"`` (default): every use of ``out`` reads ``x * mask * scale`` instead, the
same values bit for bit. The planner can then save the 1-byte mask and rebuild the
output, or save the output.

``"replay"``: forward also records the generator state before the draw
(``planner_rng::state``), and every use of the mask reads a mask regenerated from
that state (``planner_rng::replay_dropout_mask``), every use of ``out`` the output
rebuilt from it. Both are deterministic, so the planner may recompute the mask from
a few bytes of RNG state instead of keeping it. Costs one extra mask draw per
dropout in forward, and one per recomputation.

On the CPU, eager PyTorch does not run ``native_dropout`` for ``F.dropout`` (nor for
``nn.Dropout`` or the math attention kernel): it draws ``noise`` in ``x``'s dtype,
divides it in place by ``1 - p`` and returns ``x * noise``, whose backward is
``grad * noise``. AOTAutograd's decomposition records ``native_dropout`` and
``native_dropout_backward(grad, mask, 1 / (1 - p))`` instead: the same mask, but
``native_dropout_backward`` scales by the double ``1 / (1 - p)`` where eager scales by
``noise``'s value, ``1 / (1 - p)`` divided in ``x``'s dtype and rounded to it. Under
bf16 or fp16 (autocast, or bf16 parameters) they differ for every ``p`` whose scale is
not exact in that dtype, and in fp32 for some (``p = 0.15``). So on the CPU both the
output and the gradient are rebuilt as eager computes them: ``x * mask * s`` and
``grad * mask * s`` with ``s`` eager's rounded scale (``x * mask`` is exact, zeros
keep their sign, and the product with ``s`` rounds once, as ``x * noise`` does). On
CUDA eager runs the fused ``native_dropout`` kernel itself, which scales in float:
``s`` is the unrounded scale there and its backward stays.

The same rewrite is applied when planning and when running, so node names agree.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import rng_ops  # noqa: F401  (registers the planner_rng ops)
from ._torch_private import real_tensors

__all__ = ["rewrite_dropout", "DROPOUT_MODES"]

aten = torch.ops.aten
DROPOUT_MODES = ("mask", "replay")


def _fake(val: torch.Tensor, *, dtype=None) -> torch.Tensor:
    mode = getattr(val, "fake_mode", None)
    dtype = dtype or val.dtype
    if mode is None:
        return torch.empty_strided(val.shape, val.stride(), dtype=dtype, device="meta")
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=dtype, device=val.device)


def _fake_state(like: torch.Tensor) -> torch.Tensor:
    mode = getattr(like, "fake_mode", None)
    n = rng_ops.state_nbytes(like.device if like.device.type != "meta" else torch.device("cpu"))
    if mode is None:
        return torch.empty(n, dtype=torch.uint8)
    with mode:
        return torch.empty(n, dtype=torch.uint8, device="cpu")


def _meta_from(new: fx.Node, model: fx.Node, val, *, tag: str | None = None) -> None:
    """``model``'s metadata on ``new``, with value ``val`` (a new storage: a stitched or
    repeated graph's ``storage_keys`` stay with ``model``)."""
    new.meta = {k: v for k, v in model.meta.items() if k not in ("val", "tensor_meta", "storage_keys")}
    new.meta["val"] = val
    if tag is not None:
        new.meta["partitioner_tag"] = tag


def _scale(p: float, like: torch.Tensor) -> float:
    """The factor eager dropout multiplies by: on the CPU the value of its ``noise``
    tensor, ``1`` divided by ``1 - p`` in ``like``'s dtype (``noise.div_(1 - p)``); on
    CUDA ``1/(1-p)`` in float (the fused kernel scales in its accumulation type)."""
    if p == 1:
        return 0.0
    if like.device.type == "cpu":
        with real_tensors():  # the partitioner runs under AOTAutograd's fake mode
            return float(torch.ones((), dtype=like.dtype).div_(1.0 - p))
    return 1.0 / (1.0 - p)


def _rebuild(graph: fx.Graph, after: fx.Node, x: fx.Node, mask: fx.Node, scale: float, model: fx.Node) -> fx.Node:
    """``x * mask * scale`` after ``after``, as eager's ``x * noise`` computes it."""
    with graph.inserting_after(after):
        kept = graph.call_function(aten.mul.Tensor, (x, mask))
    with graph.inserting_after(kept):
        scaled = graph.call_function(aten.mul.Tensor, (kept, scale))
    _meta_from(kept, model, _fake(model.meta["val"]))
    _meta_from(scaled, model, _fake(model.meta["val"]))
    return scaled


def _eager_backward(graph: fx.Graph, mask: fx.Node, p: float) -> int:
    """On the CPU, ``native_dropout_backward(grad, mask, _)`` becomes eager's
    ``grad * noise``: ``grad * mask * s`` with ``s`` eager's rounded scale. Returns
    how many were rewritten."""
    count = 0
    for user in list(mask.users):
        if user.target is not aten.native_dropout_backward.default:
            continue
        grad = user.args[0]
        gval = grad.meta["val"]
        if gval.device.type != "cpu":
            continue
        rebuilt = _rebuild(graph, user, grad, mask, _scale(p, gval), user)
        user.replace_all_uses_with(rebuilt)
        graph.erase_node(user)
        count += 1
    return count


def rewrite_dropout(gm: fx.GraphModule, mode: str = "mask") -> int:
    """Rewrite the training-mode ``native_dropout`` nodes of ``gm`` in place; returns how many."""
    if mode not in DROPOUT_MODES:
        raise ValueError(f"unknown dropout mode {mode!r}: choose one of {', '.join(DROPOUT_MODES)}")
    graph = gm.graph
    count = backward = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.native_dropout.default:
            continue
        x, p = node.args[0], node.args[1]
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if train is False or not isinstance(p, (int, float)):
            continue
        out = mask = None
        for u in node.users:
            if u.target is operator.getitem:
                out = u if u.args[1] == 0 else out
                mask = u if u.args[1] == 1 else mask
        if out is None or mask is None:
            continue
        xval = x.meta["val"]
        scale = _scale(p, xval)
        backward += _eager_backward(graph, mask, float(p))
        if mode == "mask":
            if not out.users:
                continue
            out.replace_all_uses_with(_rebuild(graph, mask, x, mask, scale, out))
        else:
            if not out.users and not mask.users:
                continue
            # native_dropout stays (fx keeps random ops even when unused), so the
            # generator advances exactly as in eager; its outputs are replaced by
            # a mask regenerated from the recorded state and the rebuilt output.
            with graph.inserting_before(node):
                state = graph.call_function(torch.ops.planner_rng.state.default, (x,))
            _meta_from(state, node, _fake_state(xval))
            with graph.inserting_after(mask):
                replay = graph.call_function(
                    torch.ops.planner_rng.replay_dropout_mask.default,
                    (state, list(xval.shape), list(xval.stride()), xval.dtype, xval.device, float(p)),
                )
            _meta_from(replay, mask, _fake(xval, dtype=torch.bool))
            out.replace_all_uses_with(_rebuild(graph, replay, x, replay, scale, out))
            mask.replace_all_uses_with(replay)
        count += 1
    if count or backward:
        graph.lint()
        gm.recompile()
    return count

