"""The loss computed outside the model: its memory between the model's forward and backward.

In the everyday loop ``out = wrapped(**batch); loss = loss_fn(out); loss.backward()``
the loss runs eagerly, after the compiled forward has returned (every value the
plan saves is live, and the caller holds ``out``) and before the compiled backward
starts. Its forward saves what its ops' backward formulas need; its backward
runs in autograd's engine, one node at a time, and ends with the gradients of the
outputs it used: the tangents the model's backward receives, which the compiled
backward frees after their last use (AOTAutograd steals its inputs).

:func:`capture_loss` records ``loss_fn`` on detached copies of the model's
outputs as its own joint graph (the project's capture, on a small module whose
inputs are the outputs' tensors); :func:`loss_timeline` walks it the way eager
autograd runs it, which differs from a compiled graph's liveness in one way that
matters: every tensor an autograd node makes while it runs stays allocated until
the node returns (``PowBackward0`` holds ``self.pow(1)``, ``2 * that`` and the product
at once). Nodes are grouped by ``seq_nr``, the autograd node each joint-graph node
came from. Forward values saved for backward live until the last node that reads
them has run. The result, :class:`LossPhase`, is the bytes above the level the
model's forward leaves, at each point; measured on GPT-2 and Llama logits (fp32 and
bf16, ``pow(2).mean()``, cross-entropy with and without label smoothing and the
shift of causal LM training, a z-loss with Python locals), the peaks are the
profiler's exactly (``tests/test_loss_phase.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from profiles import CaptureError, GraphProfile, JointGraph, capture
from profiles._torch_private import tree_leaves, tree_map

__all__ = ["LossPhase", "LossModule", "capture_loss", "loss_timeline", "LossNotCountedWarning"]


class LossNotCountedWarning(UserWarning):
    """The model returns no scalar and no ``loss_fn`` was given: the loss's own memory is not in the budget."""


class _Slot:
    """Where the ``index``-th tensor of the outputs goes, in their structure."""

    def __init__(self, index: int):
        self.index = index


class LossModule(nn.Module):
    """``loss_fn`` as a module of the model's outputs' tensors, so that the
    project's capture records it as a joint graph; ``template`` is the outputs'
    structure (a tensor, tuple, dict, ``ModelOutput``) with :class:`_Slot` for each
    tensor."""

    def __init__(self, loss_fn: Callable[[Any], torch.Tensor], template: Any):
        super().__init__()
        self.loss_fn = loss_fn
        self.template = template

    def forward(self, *tensors):
        return self.loss_fn(tree_map(lambda x: tensors[x.index] if isinstance(x, _Slot) else x, self.template))


def capture_loss(loss_fn: Callable[[Any], torch.Tensor], outputs: Any) -> JointGraph:
    """Capture ``loss_fn(outputs)`` and its backward as one joint graph.

    ``outputs`` are the model's outputs as it returns them (a tensor, a tuple, a
    dict or a ``ModelOutput``), real or on the meta device; they are detached,
    keeping ``requires_grad``, so the graph's backward ends at them. Raises
    ``TypeError`` when ``loss_fn`` does not return a one-element tensor, and
    ``CaptureError`` when it breaks the graph (then it can be measured eagerly:
    :func:`profiles.eager_loss.measure_loss_fn`)."""
    tensors = [t.detach().requires_grad_(t.requires_grad) for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    count = iter(range(len(tensors)))
    template = tree_map(lambda t: _Slot(next(count)) if isinstance(t, torch.Tensor) else t, outputs)
    joint = capture(LossModule(loss_fn, template), tuple(tensors))
    if joint.regions:  # its timeline is walked on one graph; measure_loss_fn runs the rest
        raise CaptureError(f"loss_fn breaks the graph (at {joint.regions[-1].where})")
    out = joint.gm.graph.find_nodes(op="output")[0].args[0][0]
    val = out.meta.get("val") if hasattr(out, "meta") else None
    if not isinstance(val, torch.Tensor) or val.numel() != 1:
        shape = f" of shape {tuple(val.shape)}" if isinstance(val, torch.Tensor) else ""
        raise TypeError(
            f"loss_fn must return the loss as a one-element tensor, not {type(val).__name__}{shape}; "
            "reduce it inside loss_fn (e.g. .mean())"
        )
    return joint


@dataclass(frozen=True, kw_only=True, slots=True)
class LossPhase:
    """The loss's bytes above the level the model's forward leaves, as eager runs it."""

    #: ``(phase, node, bytes)`` after each node of the loss's forward then backward,
    #: ``phase`` being ``"loss forward"`` or ``"loss backward"``.
    points: tuple[tuple[str, str, int], ...]
    #: The largest of ``points``.
    peak_bytes: int
    #: Bytes the loss's forward leaves for its backward (saved values, the loss).
    saved_bytes: int
    #: Bytes of the gradients of the model's outputs when the loss's backward ends.
    grad_bytes: int


def _free_points(gp: GraphProfile, nodes: list, phase: dict, group: dict) -> dict[str, int]:
    """Index of the last node at which each value is live, under eager autograd."""
    index = {n.name: i for i, n in enumerate(nodes)}
    group_end: dict = {}
    for i, n in enumerate(nodes):
        if phase[n.name] == "backward":
            group_end[group[n.name]] = i
    held = {a.name for a in gp.gm.graph.find_nodes(op="output")[0].all_input_nodes}
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.name in held:
            last[n.name] = len(nodes)
            continue
        end = group_end[group[n.name]] if phase[n.name] == "backward" else i
        for u in n.users:
            if u.name not in index:
                continue
            # a value read in backward lives until the reading autograd node returns
            end = max(end, group_end[group[u.name]] if phase[u.name] == "backward" else index[u.name])
        last[n.name] = end
    return last


def loss_timeline(gp: GraphProfile) -> LossPhase:
    """Walk the captured loss (``profile_graph(capture_loss(...))``) as eager autograd runs it."""
    info = gp.nodes
    sizes = gp.storage_bytes
    static = set(gp.static_storages)
    nodes = [n for n in gp.gm.graph.nodes if n.op == "call_function"]
    index = {n.name: i for i, n in enumerate(nodes)}
    phase = {n.name: info[n.name].phase for n in nodes}
    group = {n.name: n.meta.get("seq_nr") for n in nodes}
    last = _free_points(gp, nodes, phase, group)
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for s in info[n.name].storages:
            if s not in static:
                start.setdefault(s, i)
                end[s] = max(end.get(s, -1), last[n.name])
    for n in gp.gm.graph.find_nodes(op="placeholder"):
        if n.name.startswith("tangents"):  # the seed autograd makes: held until backward returns
            first_use = min((index[u.name] for u in n.users if u.name in index), default=len(nodes))
            for s in set(info[n.name].storages) - static:
                start[s], end[s] = first_use, len(nodes)
    delta = [0] * (len(nodes) + 2)
    for s, i in start.items():
        delta[i] += sizes[s]
        delta[end[s] + 1] -= sizes[s]
    points, live = [], 0
    for i, n in enumerate(nodes):
        live += delta[i]
        points.append((f"loss {phase[n.name]}", n.name, live + info[n.name].temp_bytes))
    f = sum(1 for n in nodes if phase[n.name] == "forward") - 1  # the forward's last node
    saved = sum(sizes[s] for s, i in start.items() if i <= f < end[s])
    out = gp.gm.graph.find_nodes(op="output")[0]
    grads = [a for a in out.args[0][gp.joint.num_fwd_outputs :] if a is not None]
    grad_bytes = sum(sizes[s] for s in {s for a in grads for s in info[a.name].storages} - static)
    return LossPhase(points=tuple(points), peak_bytes=max((b for _, _, b in points), default=0),
                     saved_bytes=saved, grad_bytes=grad_bytes)
