"""The order in which a split step runs its nodes, without building GraphModules.

:func:`runtime.partition.split_joint` builds the real forward and backward graphs
(what the runtime runs); building them takes most of a second on a transformer.
The solvers evaluate dozens of candidate plans, so
:func:`planner.joint_index.fast_schedule` derives the same node orders directly
from the joint graph: the forward graph is every forward value the outputs or the
saved values need (random ops always run), the backward graph is every node the
gradients need that can be computed from the saved values and the tangents, each
recomputed value emitted just before its first user. ``tests/test_schedule.py``
checks it against :func:`schedule_of` the real split. Here: the schedule's types,
and the rules both follow (:func:`required_saved`, :func:`emit_just_in_time`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch.fx as fx

__all__ = [
    "GraphOrder",
    "Schedule",
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


def emit_just_in_time(roots, done: set, order, inputs=None) -> list:
    """Each of ``roots`` in turn, preceded by those of its ancestors not yet in
    ``done`` (in ``order``, a mapping from node to position): the order in which
    backward reaches recomputed values. ``inputs(n)`` gives a node's inputs (default:
    an fx node's ``all_input_nodes``). ``done`` is updated; returns the newly emitted
    nodes in order."""
    inputs_of = inputs or (lambda n: n.all_input_nodes)
    out = []
    for root in roots:
        pending, stack, seen = [], [root], set()
        while stack:
            n = stack.pop()
            if n in done or n in seen:
                continue
            seen.add(n)
            pending.append(n)
            stack.extend(inputs_of(n))
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
