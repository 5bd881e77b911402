"""The joint graph as integer arrays, to derive split schedules quickly.

:func:`fast_schedule` is called for every candidate plan the solvers and the
arrangement evaluate: hundreds of times on a deep model. Walking
the fx graph each time (``Node.all_input_nodes`` builds a list per call) costs
more than the simulation. :class:`JointIndex` holds, once per joint graph, what
those walks read: each node's inputs as indices, its kind, and the parts of the
split that do not depend on the plan (what forward can compute from the primals,
the values backward reads). :func:`indexed_schedule` follows the rules of
:mod:`planner.schedule` on it and gives the schedule of the graphs
:func:`runtime.partition.split_joint` builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch.fx as fx

from profiles._torch_private import is_random_op
from profiles.joint import JointGraph

from .schedule import GraphOrder, Schedule, emit_just_in_time

__all__ = ["JointIndex", "index_joint", "indexed_schedule", "fast_schedule"]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class JointIndex:
    """One joint graph, node by node in graph order (the output node left out)."""

    #: Node names.
    names: tuple[str, ...]
    #: Index of each node name.
    position: dict[str, int]
    #: Each node's input nodes, as indices (``Node.all_input_nodes``).
    inputs: tuple[tuple[int, ...], ...]
    #: ``(name, op, input names)`` per node: a :class:`GraphOrder` entry.
    entries: tuple[tuple[str, str, tuple[str, ...]], ...]
    #: Whether each node is a forward computation (:func:`planner.schedule.forward_node_names`).
    is_forward: tuple[bool, ...]
    #: Whether each node is a call_function.
    is_call: tuple[bool, ...]
    #: Whether each node is a placeholder.
    is_placeholder: tuple[bool, ...]
    #: Whether each node is a tangent placeholder.
    is_tangent: tuple[bool, ...]
    #: Whether each node is handed to backward without a version check.
    no_vc_check: tuple[bool, ...]
    #: Whether forward can compute each node from the primals alone.
    forward_computable: tuple[bool, ...]
    #: Forward-computable random forward ops (they always run).
    random_forward: tuple[int, ...]
    #: Forward values and non-tangent placeholders read by backward nodes.
    backward_reads: tuple[int, ...]
    #: The tangent placeholders.
    tangents: tuple[int, ...]
    #: The model's outputs (graph outputs before ``num_fwd_outputs``).
    forward_outputs: tuple[int, ...]
    #: The gradients (graph outputs from ``num_fwd_outputs`` on).
    backward_outputs: tuple[int, ...]


def index_joint(joint: JointGraph) -> JointIndex:
    """The :class:`JointIndex` of ``joint``'s graph."""
    nodes = list(joint.gm.graph.nodes)
    out_node = nodes[-1]
    nodes = nodes[:-1]
    position = {n.name: i for i, n in enumerate(nodes)}
    at = {n: i for i, n in enumerate(nodes)}
    inputs = tuple(tuple(at[a] for a in n.all_input_nodes) for n in nodes)
    is_call = tuple(n.op == "call_function" for n in nodes)
    is_forward = tuple(c and n.meta.get("partitioner_tag") != "is_backward" for n, c in zip(nodes, is_call))
    is_placeholder = tuple(n.op == "placeholder" for n in nodes)
    is_tangent = tuple(p and n.name.startswith("tangents") for n, p in zip(nodes, is_placeholder))
    computable: list[bool] = []
    for i, n in enumerate(nodes):
        if is_placeholder[i]:
            computable.append(not is_tangent[i])
        else:
            computable.append(n.op in ("call_function", "get_attr") and all(computable[a] for a in inputs[i]))
    reads = []
    for i in range(len(nodes)):
        if is_call[i] and not is_forward[i]:
            reads += [a for a in inputs[i] if is_forward[a] or (is_placeholder[a] and not is_tangent[a])]
    out_args = out_node.args[0] if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]
    nfo = joint.num_fwd_outputs
    return JointIndex(
        names=tuple(n.name for n in nodes),
        position=position,
        inputs=inputs,
        entries=tuple((n.name, n.op, tuple(nodes[a].name for a in inputs[i])) for i, n in enumerate(nodes)),
        is_forward=is_forward,
        is_call=is_call,
        is_placeholder=is_placeholder,
        is_tangent=is_tangent,
        no_vc_check=tuple(bool(n.meta.get("saved_tensor_with_no_vc_check")) for n in nodes),
        forward_computable=tuple(computable),
        random_forward=tuple(i for i, n in enumerate(nodes)
                             if computable[i] and is_forward[i] and is_random_op(n.target)),
        backward_reads=tuple(reads),
        tangents=tuple(i for i in range(len(nodes)) if is_tangent[i]),
        forward_outputs=tuple(at[a] for a in out_args[:nfo] if isinstance(a, fx.Node)),
        backward_outputs=tuple(at[a] for a in out_args[nfo:] if isinstance(a, fx.Node)),
    )


def _saved(ix: JointIndex, recompute: set[int]) -> list[int]:
    """:func:`planner.schedule.required_saved` on indices, in graph order."""
    saved: set[int] = set()
    visited: set[int] = set()
    stack = list(ix.backward_reads)
    while stack:
        i = stack.pop()
        if i in visited:
            continue
        visited.add(i)
        if i in recompute and ix.is_forward[i]:
            stack.extend(ix.inputs[i])
        elif not ix.is_tangent[i]:
            saved.add(i)
    return sorted(saved)


def _forward(ix: JointIndex, outputs: list[int]) -> list[tuple]:
    """The forward graph's entries: the forward-computable nodes ``outputs`` need,
    random ops always, placeholders (not tangents) all."""
    needed: set[int] = set()
    stack = outputs + list(ix.random_forward)
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(ix.inputs[i])
    return [ix.entries[i] for i in range(len(ix.names))
            if ix.forward_computable[i] and (ix.is_placeholder[i] or i in needed)]


def _backward(ix: JointIndex, saved: list[int]) -> tuple[list[int], list[tuple]]:
    """``(saved values kept, backward graph's entries)``: placeholders (saved, then
    tangents), then every node computable from them that the gradients need,
    recomputed values just in time. Saved values no backward node reads are dropped,
    as the real split drops them; those handed over without a version check go last,
    as AOTAutograd puts them."""
    saved_set = set(saved)
    valid = [False] * len(ix.names)
    for i in saved:
        valid[i] = True
    for i in ix.tangents:
        valid[i] = True
    for i in range(len(ix.names)):
        if not valid[i] and ix.is_call[i] and all(valid[a] for a in ix.inputs[i]):
            valid[i] = True
    needed: set[int] = set()
    stack = [i for i in ix.backward_outputs if valid[i]]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(a for a in ix.inputs[i] if a not in saved_set)
    used: set[int] = set()
    for i in needed:
        used.update(ix.inputs[i])
    outputs = set(ix.backward_outputs)
    kept = [i for i in saved if i in used or i in outputs]
    kept = [i for i in kept if not ix.no_vc_check[i]] + [i for i in kept if ix.no_vc_check[i]]
    entries = [(ix.names[i], "placeholder", ()) for i in kept + list(ix.tangents)]
    roots = [i for i in sorted(needed) if i not in saved_set and ix.is_call[i] and not ix.is_forward[i]]
    emitted = emit_just_in_time(roots, set(kept) | set(ix.tangents), range(len(ix.names)), ix.inputs.__getitem__)
    entries += [ix.entries[i] for i in emitted]
    return kept, entries


def indexed_schedule(ix: JointIndex, recompute: Iterable[str]) -> Schedule:
    """The schedule :func:`runtime.partition.split_joint` would produce for ``recompute``."""
    rec = {ix.position[n] for n in recompute if n in ix.position}
    saved = _saved(ix, rec)
    forward_entries = _forward(ix, list(ix.forward_outputs) + saved)
    kept, backward_entries = _backward(ix, saved)
    names = ix.names
    backward = GraphOrder(nodes=tuple(backward_entries),
                          outputs=tuple(dict.fromkeys(names[i] for i in ix.backward_outputs)))
    outs = tuple(dict.fromkeys([names[i] for i in ix.forward_outputs] + [names[i] for i in kept]))
    forward = GraphOrder(nodes=tuple(forward_entries), outputs=outs)
    return Schedule(forward=forward, backward=backward, saved=tuple(names[i] for i in kept))


def fast_schedule(joint: JointGraph, recompute: Iterable[str]) -> Schedule:
    """The schedule :func:`runtime.partition.split_joint` would produce for ``recompute``
    (index the graph once with :func:`index_joint` to derive many)."""
    return indexed_schedule(index_joint(joint), recompute)
