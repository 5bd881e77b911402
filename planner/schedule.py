"""The order in which a split step runs its nodes, without building GraphModules.

:func:`runtime.partition.split_joint` builds the real forward and backward graphs
(what the runtime runs); building them takes most of a second on a transformer.
The solvers evaluate dozens of candidate plans, so :func:`fast_schedule` derives
the same node orders directly from the joint graph: the forward graph is every
forward value the outputs or the saved values need (random ops always run), the
backward graph is every node the gradients need that can be computed from the
saved values and the tangents, each recomputed value emitted just before its first
user. ``tests/test_schedule.py`` checks it against :func:`schedule_of` the real split.
The rules both follow (:func:`required_saved`, :func:`emit_just_in_time`) are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch.fx as fx

from profiles._torch_private import is_random_op
from profiles.joint import JointGraph

__all__ = [
    "GraphOrder",
    "Schedule",
    "fast_schedule",
    "schedule_of",
    "required_saved",
    "forward_node_names",
    "emit_just_in_time",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphOrder:
    """One graph in run order."""

    #: ``(name, op, input names)`` per node, in run order (the output node left out).
    nodes: tuple[tuple[str, str, tuple[str, ...]], ...]
    #: Names of the values the graph returns.
    outputs: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """The two graphs of a split step."""

    #: The forward graph.
    forward: GraphOrder
    #: The backward graph, recomputation included.
    backward: GraphOrder
    #: Values forward hands to backward.
    saved: tuple[str, ...]


def forward_node_names(gm: fx.GraphModule) -> set[str]:
    """Names of the joint graph's forward computations (not placeholders)."""
    return {
        n.name
        for n in gm.graph.nodes
        if n.op == "call_function" and n.meta.get("partitioner_tag") != "is_backward"
    }


def required_saved(gm: fx.GraphModule, recompute: Iterable[str]) -> list[fx.Node]:
    """The values forward must hand to backward when ``recompute`` are recomputed.

    Backward needs every forward value its nodes read. A needed value that is in
    ``recompute`` is rebuilt from its own inputs, which are needed in turn; any
    other needed value (parameters and inputs included) is saved.
    """
    recompute = set(recompute)
    fwd = forward_node_names(gm)
    saved: dict[str, fx.Node] = {}
    visited: set[str] = set()
    stack: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.name not in fwd:  # a backward node
            for a in node.all_input_nodes:
                if a.name in fwd or (a.op == "placeholder" and not a.name.startswith("tangents")):
                    stack.append(a)
    while stack:
        node = stack.pop()
        if node.name in visited:
            continue
        visited.add(node.name)
        if node.name in recompute and node.name in fwd:
            stack.extend(a for a in node.all_input_nodes)
        else:
            if node.op == "placeholder" and node.name.startswith("tangents"):
                continue
            saved[node.name] = node
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(saved.values(), key=order.__getitem__)


def emit_just_in_time(roots, done: set, order: dict) -> list:
    """Each of ``roots`` in turn, preceded by those of its ancestors not yet in
    ``done`` (in ``order``): the order in which backward reaches recomputed values.
    ``done`` is updated; returns the newly emitted nodes in order."""
    out = []
    for root in roots:
        pending, stack, seen = [], [root], set()
        while stack:
            n = stack.pop()
            if n in done or n in seen:
                continue
            seen.add(n)
            pending.append(n)
            stack.extend(n.all_input_nodes)
        for n in sorted(pending, key=order.__getitem__):
            done.add(n)
            out.append(n)
    return out


def _order_of(gm: fx.GraphModule) -> GraphOrder:
    nodes, outputs = [], ()
    for n in gm.graph.nodes:
        if n.op == "output":
            outputs = tuple(a.name for a in n.all_input_nodes)
            break
        nodes.append((n.name, n.op, tuple(a.name for a in n.all_input_nodes)))
    return GraphOrder(nodes=tuple(nodes), outputs=outputs)


def schedule_of(fwd: fx.GraphModule, bwd: fx.GraphModule) -> Schedule:
    """The schedule of real forward and backward graphs."""
    saved = tuple(n.name for n in bwd.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents"))
    return Schedule(forward=_order_of(fwd), backward=_order_of(bwd), saved=saved)


def _is_random(node: fx.Node) -> bool:
    return is_random_op(node.target)


def fast_schedule(joint: JointGraph, recompute) -> Schedule:
    """The schedule :func:`runtime.partition.split_joint` would produce for ``recompute``."""
    gm = joint.gm
    nodes = list(gm.graph.nodes)
    out_node = nodes[-1]
    out_args = [a for a in out_node.args[0]] if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]
    nfo = joint.num_fwd_outputs
    fwd_outputs = [a for a in out_args[:nfo] if isinstance(a, fx.Node)]
    bwd_outputs = [a for a in out_args[nfo:] if isinstance(a, fx.Node)]
    saved_nodes = required_saved(gm, recompute)
    fwd_names = forward_node_names(gm)
    fwd_order = _forward_nodes(nodes, fwd_outputs + saved_nodes, fwd_names)
    saved_kept, bwd_order = _backward_nodes(nodes, saved_nodes, bwd_outputs, fwd_names)
    backward = GraphOrder(nodes=tuple(bwd_order), outputs=tuple(dict.fromkeys(a.name for a in bwd_outputs)))
    outs = tuple(dict.fromkeys([a.name for a in fwd_outputs] + [n.name for n in saved_kept]))  # as fx lists them
    forward = GraphOrder(nodes=tuple(fwd_order), outputs=outs)
    return Schedule(forward=forward, backward=backward, saved=tuple(n.name for n in saved_kept))


def _forward_nodes(nodes: list[fx.Node], outputs: list[fx.Node], fwd_names: set[str]) -> list:
    """The forward graph's nodes: those computable from the primals that
    ``outputs`` (the model's outputs and the saved values) need; random ops always
    run (dead-code elimination keeps them)."""
    valid_f: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder":
            if not n.name.startswith("tangents"):
                valid_f.add(n)
        elif n.op in ("call_function", "get_attr") and all(a in valid_f for a in n.all_input_nodes):
            valid_f.add(n)
    needed: set[fx.Node] = set()
    stack = list(outputs)
    stack += [n for n in nodes if n in valid_f and n.op == "call_function" and _is_random(n) and n.name in fwd_names]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return [
        (n.name, n.op, tuple(a.name for a in n.all_input_nodes))
        for n in nodes
        if n in valid_f and (n.op == "placeholder" or n in needed)
    ]


def _backward_nodes(nodes: list[fx.Node], saved_nodes: list[fx.Node], bwd_outputs: list[fx.Node],
                    fwd_names: set[str]) -> tuple[list[fx.Node], list]:
    """``(saved values kept, backward graph's nodes)``: placeholders (saved, then
    tangents), then every node computable from them that the gradients need,
    recomputed values just in time."""
    saved_set = set(saved_nodes)
    tangents = [n for n in nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    valid_b: set[fx.Node] = set(saved_set) | set(tangents)
    for n in nodes:
        if n in valid_b or n.op != "call_function":
            continue
        if all(a in valid_b for a in n.all_input_nodes):
            valid_b.add(n)
    needed_b: set[fx.Node] = set()
    stack = [a for a in bwd_outputs if a in valid_b]
    while stack:
        n = stack.pop()
        if n in needed_b:
            continue
        needed_b.add(n)
        stack.extend(a for a in n.all_input_nodes if a not in saved_set)
    # placeholders used by nobody are dropped from ``saved`` by the real split
    used = set()
    for n in needed_b:
        used.update(n.all_input_nodes)
    saved_kept = [n for n in saved_nodes if n in used or n in bwd_outputs]
    # AOTAutograd puts the values handed over without a version check last
    saved_kept = [n for n in saved_kept if not n.meta.get("saved_tensor_with_no_vc_check")] + [
        n for n in saved_kept if n.meta.get("saved_tensor_with_no_vc_check")
    ]
    order = {n: i for i, n in enumerate(nodes)}
    bwd_order = [(n.name, "placeholder", ()) for n in saved_kept + tangents]
    roots = [n for n in nodes if n in needed_b and n not in saved_set and n.op == "call_function" and n.name not in fwd_names]
    for n in emit_just_in_time(roots, set(saved_kept) | set(tangents), order):
        bwd_order.append((n.name, n.op, tuple(a.name for a in n.all_input_nodes)))
    return saved_kept, bwd_order
