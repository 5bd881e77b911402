"""Make dropout's output recomputable, in one of two ways.

``native_dropout(x, p, train)`` returns ``(out, mask)`` with ``out = x * mask * scale``.
Running it again in backward would draw a new mask, so the op itself is never
recomputed. Two rewrites of the joint graph make ``out`` a deterministic function:

``"mask"`` (default): every use of ``out`` reads ``where(mask, x, 0) * scale``
instead, the same values bit for bit. The planner can then save the 1-byte mask
and rebuild the output, or save the output.

``"replay"``: forward also records the generator state before the draw
(``planner_rng::state``), and every use of the mask reads a mask regenerated from
that state (``planner_rng::replay_dropout_mask``), every use of ``out`` the output
rebuilt from it. Both are deterministic, so the planner may recompute the mask from
a few bytes of RNG state instead of keeping it. Costs one extra mask draw per
dropout in forward, and one per recomputation.

The same rewrite is applied when planning and when running, so node names agree.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import rng_ops  # noqa: F401  (registers the planner_rng ops)

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
    new.meta = {k: v for k, v in model.meta.items() if k not in ("val", "tensor_meta")}
    new.meta["val"] = val
    if tag is not None:
        new.meta["partitioner_tag"] = tag


def _scale(p: float, like: torch.Tensor) -> float:
    """The factor native_dropout multiplies by: on CPU ``1/(1-p)`` rounded to the
    tensor's dtype first (the kernel multiplies by a dtype-typed mask), on CUDA in
    float (the fused kernel scales in its accumulation type)."""
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    if like.device.type == "cpu":
        return float(torch.tensor(scale, dtype=like.dtype))
    return scale


def rewrite_dropout(gm: fx.GraphModule, mode: str = "mask") -> int:
    """Rewrite the training-mode ``native_dropout`` nodes of ``gm`` in place; returns how many."""
    if mode not in DROPOUT_MODES:
        raise ValueError(f"unknown dropout mode {mode!r}: choose one of {', '.join(DROPOUT_MODES)}")
    graph = gm.graph
    count = 0
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
        if mode == "mask":
            if not out.users:
                continue
            with graph.inserting_after(mask):
                kept = graph.call_function(aten.where.ScalarOther, (mask, x, 0.0))
            with graph.inserting_after(kept):
                scaled = graph.call_function(aten.mul.Tensor, (kept, scale))
            _meta_from(kept, out, _fake(out.meta["val"]))
            _meta_from(scaled, out, _fake(out.meta["val"]))
            out.replace_all_uses_with(scaled)
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
            with graph.inserting_after(replay):
                kept = graph.call_function(aten.where.ScalarOther, (replay, x, 0.0))
            with graph.inserting_after(kept):
                scaled = graph.call_function(aten.mul.Tensor, (kept, scale))
            _meta_from(replay, mask, _fake(xval, dtype=torch.bool))
            _meta_from(kept, out, _fake(out.meta["val"]))
            _meta_from(scaled, out, _fake(out.meta["val"]))
            out.replace_all_uses_with(scaled)
            mask.replace_all_uses_with(replay)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count

