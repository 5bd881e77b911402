"""The gradients of outputs the loss does not flow through: skipped when the model returns its loss.

A model that returns its loss with other outputs (a language model's loss and its
logits) is trained with ``out.loss.backward()``. The engine then has no gradient
for the logits, and by default AOTAutograd's autograd function is handed a zero
tensor of their size before backward starts, which the backward graph adds to the
logits' gradient from the loss (``add(tangents_2, grad)``). Eager PyTorch allocates
no such tensor. The runtime (:mod:`runtime.zero_grads`) lets those gradients
arrive as ``None`` instead, and runs such an ``add`` as its other operand (or a copy
of it in the sum's layout): the same values, without the zero tensor.

:func:`skippable_tangents` names the tangents that can arrive as ``None`` and
their ``add``; :func:`without_zero_tangents` gives the profile the simulator needs
for that step (the tangent allocates nothing, the ``add`` is its operand);
:func:`skips_zero_tangents` says when the planner and the runtime both do this.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from profiles.graph_profile import GraphProfile

__all__ = ["skips_zero_tangents", "skippable_tangents", "without_zero_tangents", "profile_as_run"]


def skips_zero_tangents(*, loss: str | None, executor: str, regions: bool, blocks: bool) -> bool:
    """Whether a step's gradients of outputs other than the loss arrive as ``None``:
    when the model returns its loss (``TrainingLoopInfo.loss == "model"``: the loop
    calls ``backward`` on it alone) and one graph runs op by op (not Inductor's
    kernels, not graph regions, not per-block FSDP2's graphs)."""
    return loss == "model" and executor == "eager" and not regions and not blocks


def skippable_tangents(gm: fx.GraphModule) -> dict[str, tuple[str, str, bool]]:
    """``{tangent: (add, other, alias)}`` for each tangent of more than one element whose
    only use is ``add(tangent, other)`` (either order, no ``alpha``) with ``other`` of the
    sum's shape and dtype: with the tangent missing the sum is ``other``'s values, which
    ``alias`` (``other`` has the sum's strides too) lets the step use as they are, else
    copied into the sum's layout. Names are the joint graph's (the backward graph keeps them)."""
    found: dict[str, tuple[str, str, bool]] = {}
    for t in gm.graph.find_nodes(op="placeholder"):
        val = t.meta.get("val")
        if not t.name.startswith("tangents") or not isinstance(val, torch.Tensor) or val.numel() <= 1 or len(t.users) != 1:
            continue
        (use,) = t.users
        if use.target is not torch.ops.aten.add.Tensor or use.kwargs or len(use.args) != 2:
            continue
        other = use.args[1] if use.args[0] is t else use.args[0]
        if not isinstance(other, fx.Node) or other is t:
            continue
        ov, uv = other.meta.get("val"), use.meta.get("val")
        if not (isinstance(ov, torch.Tensor) and isinstance(uv, torch.Tensor)):
            continue
        if ov.shape == val.shape == uv.shape and ov.dtype == val.dtype == uv.dtype:
            found[t.name] = (use.name, other.name, ov.stride() == uv.stride())
    return found


def without_zero_tangents(gp: GraphProfile, skippable: dict[str, tuple[str, str, bool]]) -> GraphProfile:
    """``gp`` for the step whose ``skippable`` tangents arrive as ``None``: they refer
    to no storage; an ``add`` whose other operand it may alias allocates nothing and
    refers (with its views) to that operand's storage; any other ``add`` allocates its
    copy of the operand, as it allocated the sum."""
    if not skippable:
        return gp
    nodes = dict(gp.nodes)
    remap: dict[int, int] = {}
    for t, (add, other, alias) in skippable.items():
        nodes[t] = dataclasses.replace(nodes[t], storages=(), bytes=0)
        own, into = nodes[add].storages, nodes[other].storages
        if alias and len(own) == 1 and len(into) == 1:
            nodes[add] = dataclasses.replace(nodes[add], bytes=0, temp_bytes=0)
            remap[own[0]] = into[0]

    def resolve(s: int) -> int:
        while s in remap:
            s = remap[s]
        return s

    for name, info in nodes.items():
        if any(s in remap for s in info.storages):
            nodes[name] = dataclasses.replace(info, storages=tuple(resolve(s) for s in info.storages))
    return dataclasses.replace(gp, nodes=nodes)


def profile_as_run(gp: GraphProfile, *, loss: str | None, blocks: bool) -> GraphProfile:
    """``gp`` for the step the runtime runs: without the skippable tangents when
    :func:`skips_zero_tangents` holds for the plan's loss (``TrainingLoopInfo.loss``,
    None without a training loop), its executor and regions, and ``blocks`` (per-block FSDP2)."""
    if not skips_zero_tangents(loss=loss, executor=gp.joint.executor, regions=bool(gp.joint.regions), blocks=blocks):
        return gp
    return without_zero_tangents(gp, skippable_tangents(gp.gm))
