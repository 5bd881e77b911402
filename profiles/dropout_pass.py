"""Make dropout's output recomputable: keep the random mask, rebuild the output.

``native_dropout(x, p, train)`` returns ``(out, mask)`` with ``out = (x * mask) * scale``.
Running it again in backward would draw a new mask, so the op itself can never be
recomputed. This pass rewrites every use of ``out`` to ``mul(mul(x, mask), scale)``:
multiplying by 0 or 1 is exact, so the value is bit-for-bit the one dropout
produced, but it is a deterministic function of ``x`` and the mask. The planner can
then save the 1-byte mask and recompute the output instead of saving it.

The pass is applied to the joint graph both when planning and when running, so
node names agree.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["rebuild_dropout_outputs"]

aten = torch.ops.aten


def _fresh_like(val: torch.Tensor) -> torch.Tensor:
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty_like(val, device="meta")
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)


def rebuild_dropout_outputs(gm: fx.GraphModule) -> int:
    """Rewrite ``native_dropout`` outputs in place; returns how many were rewritten."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.native_dropout.default:
            continue
        x = node.args[0]
        p = node.args[1]
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if train is False or not isinstance(p, (int, float)):
            continue
        out = mask = None
        for u in node.users:
            if u.target is operator.getitem:
                if u.args[1] == 0:
                    out = u
                elif u.args[1] == 1:
                    mask = u
        if out is None or mask is None or not out.users:
            continue
        scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
        with graph.inserting_after(mask):
            masked = graph.call_function(aten.mul.Tensor, (x, mask))
        with graph.inserting_after(masked):
            scaled = graph.call_function(aten.mul.Tensor, (masked, scale))
        for new in (masked, scaled):
            new.meta = {k: v for k, v in out.meta.items() if k != "val"}
            new.meta["val"] = _fresh_like(out.meta["val"])
            if "tensor_meta" in out.meta:
                new.meta["tensor_meta"] = out.meta["tensor_meta"]
        out.replace_all_uses_with(scaled)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
