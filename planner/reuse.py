"""Write an op's output into the buffer of an input that dies at it.

AOTAutograd's graphs are functional: every op allocates its output, even when an
input of the same shape is dead right after it. Eager PyTorch avoids some of those
allocations (the autograd engine accumulates gradients in place), so a functional
step can peak above eager's. :func:`plan_reuse` finds, for a schedule, the
elementwise ops (and softmax backward ops) one of whose inputs is dead after them
and has exactly the output's shape, dtype and contiguous layout, and whose storage
nothing else refers to: the op can write into that input
(``aten.add.out(a, b, out=a)``), computing the same values bit for bit.

Never reused: graph inputs (parameters, the tangents the caller may hold, values
forward hands to backward), anything that aliases them, values a graph returns, and
model outputs the caller holds during backward. :func:`profile_with_reuse` gives
the profile the simulator needs for the rewritten graphs; :func:`apply_reuse`
rewrites a ``GraphModule`` (what the runtime runs).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
import torch.fx as fx

from profiles.graph_profile import GraphProfile

from .schedule import GraphOrder, Schedule
from .simulate import held_tangents

__all__ = ["OUT_VARIANTS", "Reuse", "out_variant", "plan_reuse", "profile_with_reuse", "apply_reuse"]

_A = torch.ops.aten
#: functional overload -> (its out= overload, the out argument's name). Only ops
#: whose out= kernel writes into ``out`` directly (structured kernels); an out=
#: form that computes into a temporary and copies (``relu``, ``masked_fill``,
#: ``native_dropout_backward``, the ``.Scalar`` overloads) would save nothing.
#: ``tests/test_order.py`` measures that each one allocates nothing.
OUT_VARIANTS: dict = {
    _A.add.Tensor: (_A.add.out, "out"),
    _A.sub.Tensor: (_A.sub.out, "out"),
    _A.mul.Tensor: (_A.mul.out, "out"),
    _A.div.Tensor: (_A.div.out, "out"),
    _A.neg.default: (_A.neg.out, "out"),
    _A.exp.default: (_A.exp.out, "out"),
    _A.log.default: (_A.log.out, "out"),
    _A.sin.default: (_A.sin.out, "out"),
    _A.cos.default: (_A.cos.out, "out"),
    _A.sqrt.default: (_A.sqrt.out, "out"),
    _A.rsqrt.default: (_A.rsqrt.out, "out"),
    _A.reciprocal.default: (_A.reciprocal.out, "out"),
    _A.tanh.default: (_A.tanh.out, "out"),
    _A.sigmoid.default: (_A.sigmoid.out, "out"),
    _A.erf.default: (_A.erf.out, "out"),
    _A.silu.default: (_A.silu.out, "out"),
    _A.gelu.default: (_A.gelu.out, "out"),
    _A.softplus.default: (_A.softplus.out, "out"),
    _A.pow.Tensor_Scalar: (_A.pow.Tensor_Scalar_out, "out"),
    _A.where.self: (_A.where.self_out, "out"),
    _A.bitwise_and.Tensor: (_A.bitwise_and.Tensor_out, "out"),
    _A.silu_backward.default: (_A.silu_backward.grad_input, "grad_input"),
    _A.gelu_backward.default: (_A.gelu_backward.grad_input, "grad_input"),
    _A.tanh_backward.default: (_A.tanh_backward.grad_input, "grad_input"),
    _A.sigmoid_backward.default: (_A.sigmoid_backward.grad_input, "grad_input"),
    _A.threshold_backward.default: (_A.threshold_backward.grad_input, "grad_input"),
    _A.softplus_backward.default: (_A.softplus_backward.grad_input, "grad_input"),
    # row-wise: each row's sum is taken before the row is written
    _A._log_softmax_backward_data.default: (_A._log_softmax_backward_data.out, "out"),
    _A._softmax_backward_data.default: (_A._softmax_backward_data.out, "grad_input"),
}


def out_variant(target) -> tuple | None:
    """``(out= overload, out argument name)`` for an op that may write into an input."""
    return OUT_VARIANTS.get(target)


def _held(gp: GraphProfile, schedule: Schedule) -> tuple[set[int], set[int]]:
    """Storages the forward and the backward graph must not write into."""
    def st(names):
        return {s for n in names for s in gp.nodes[n].storages}

    static = set(gp.static_storages)
    nfo = gp.joint.num_fwd_outputs
    fwd_inputs = [n for n, op, _ in schedule.forward.nodes if op == "placeholder"]
    bwd_inputs = [n for n, op, _ in schedule.backward.nodes if op == "placeholder"]
    held_f = static | st(schedule.forward.outputs) | st(fwd_inputs)
    held_b = static | st(schedule.backward.outputs) | st(schedule.forward.outputs[:nfo]) | st(bwd_inputs)
    return held_f, held_b | st(held_tangents(gp))


def _fits(val, other) -> bool:
    return (
        isinstance(val, torch.Tensor) and isinstance(other, torch.Tensor) and val.shape == other.shape
        and val.dtype == other.dtype and other.is_contiguous() and val.is_contiguous()
        and other.untyped_storage().nbytes() == other.numel() * other.element_size()
    )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Reuse:
    """Which nodes write into an input's buffer, per graph."""

    #: ``{node: input}`` in run order, for the forward and the backward graph.
    forward: dict[str, str]
    backward: dict[str, str]
    #: Storage id of each rewritten node's own output -> the storage it writes into.
    storage_map: dict[int, int]


def _reuse_in(gp: GraphProfile, order: GraphOrder, held: set[int], skip: set[str], storage_map: dict[int, int],
              memo: dict) -> dict[str, str]:
    nodes = memo.get("nodes")
    if nodes is None:
        nodes = memo["nodes"] = {n.name: n for n in gp.gm.graph.nodes}
        # the nodes that may write into an input: one storage, an out= form
        memo["writers"] = {n.name for n in gp.gm.graph.nodes if n.op == "call_function"
                           and len(gp.nodes[n.name].storages) == 1 and out_variant(n.target) is not None}
    writers = memo["writers"]
    fits = memo.setdefault("fits", {})
    last: dict[int, int] = {}
    for i, (n, _, inputs) in enumerate(order.nodes):
        for a in (n, *inputs):
            for s in gp.nodes[a].storages:
                last[s] = i
    out: dict[str, str] = {}
    for i, (n, op, inputs) in enumerate(order.nodes):
        if n not in writers or n in skip:
            continue
        for a in dict.fromkeys(inputs):
            sts = gp.nodes[a].storages
            if a in skip or len(sts) != 1 or sts[0] in held or last[sts[0]] != i:
                continue
            if (n, a) not in fits:
                fits[(n, a)] = _fits(nodes[n].meta.get("val"), nodes[a].meta.get("val"))
            if not fits[(n, a)]:
                continue
            if any(b != a and sts[0] in gp.nodes[b].storages for b in inputs):
                continue  # another input is a view into the same buffer
            out[n] = a
            storage_map[gp.nodes[n].storages[0]] = storage_map.get(sts[0], sts[0])
            break
    return out


def plan_reuse(gp: GraphProfile, schedule: Schedule, *, memo: dict | None = None) -> Reuse:
    """The nodes of ``schedule`` that can write their output into a dying input.
    Nodes that run in both graphs (forward values recomputed in backward that forward
    also computes) are left as they are. ``memo``: a dict kept between calls on the
    same ``gp`` (what depends on the graph alone, not on the order)."""
    memo = {} if memo is None else memo
    held_f, held_b = _held(gp, schedule)
    both = {n for n, _, _ in schedule.forward.nodes} & {n for n, _, _ in schedule.backward.nodes}
    # the forward graph's choice, kept for the schedules that share its order (held
    # sets and the nodes run in both graphs follow from the orders' nodes and outputs)
    cached = memo.get("forward")
    if cached is not None and cached[0] is schedule.forward and cached[1] == both:
        fwd, storage_map = cached[2], dict(cached[3])
    else:
        storage_map = {}
        fwd = _reuse_in(gp, schedule.forward, held_f, both, storage_map, memo)
        memo["forward"] = (schedule.forward, both, fwd, dict(storage_map))
    bwd = _reuse_in(gp, schedule.backward, held_b, both, storage_map, memo)
    return Reuse(forward=fwd, backward=bwd, storage_map=storage_map)


def profile_with_reuse(gp: GraphProfile, reuse: Reuse, *, memo: dict | None = None) -> GraphProfile:
    """``gp`` for the rewritten graphs: a rewritten node allocates nothing (no
    temporary either), and it and its views refer to the buffer it writes into.
    ``memo``: a dict kept between calls on the same ``gp`` (node records included)."""
    memo = {} if memo is None else memo
    users = memo.get("storage_users")
    if users is None:
        users = memo["storage_users"] = {}
        for name, info in gp.nodes.items():
            for s in info.storages:
                users.setdefault(s, []).append(name)
    m = reuse.storage_map
    touched = {n for s in m for n in users.get(s, ())} | set(reuse.forward) | set(reuse.backward)
    if not touched:
        return gp
    nodes = dict(gp.nodes)
    infos = memo.setdefault("infos", {})
    for name in touched:
        info = nodes[name]
        key = (name, tuple(m.get(s, s) for s in info.storages), name in reuse.forward or name in reuse.backward)
        if key not in infos:
            # a rewritten op's out= form allocates nothing, not even a temporary (tests/test_order.py)
            infos[key] = dataclasses.replace(info, storages=key[1], bytes=0 if key[2] else info.bytes,
                                             temp_bytes=0 if key[2] else info.temp_bytes)
        nodes[name] = infos[key]
    return dataclasses.replace(gp, nodes=nodes)


def apply_reuse(gm: fx.GraphModule, rewrites: Mapping[str, str]) -> fx.GraphModule:
    """Rewrite the nodes of ``gm`` named in ``rewrites`` (one graph's part of a
    :class:`Reuse`) to their out= form, in place; returns ``gm``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for n, a in rewrites.items():
        node = by_name[n]
        op, arg = OUT_VARIANTS[node.target]
        node.target = op
        node.kwargs = {**node.kwargs, arg: by_name[a]}
    gm.graph.lint()
    gm.recompile()
    return gm
