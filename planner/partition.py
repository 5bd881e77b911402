"""Turn save/recompute decisions into the forward and backward graphs the runtime runs.

The backward graph recomputes every forward value it needs that was not saved,
each just before its first use (the order the autograd engine would reach it), so
a recomputed value lives only as long as backward needs it. The memory simulator
and the runtime both call :func:`split_joint`, so the simulated graphs are the
graphs that run.
"""

from __future__ import annotations

from typing import Iterable

import torch.fx as fx

from profiles._torch_private import extract_fwd_bwd_modules, keep_random_ops
from profiles.capture import JointGraph

__all__ = ["split_joint", "required_saved", "forward_node_names", "emit_just_in_time", "PlanInfeasible"]


class PlanInfeasible(ValueError):
    """Decisions from which backward cannot get a value it needs."""


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


def split_joint(joint: JointGraph | fx.GraphModule, recompute: Iterable[str], *, num_fwd_outputs: int | None = None):
    """Forward and backward ``GraphModule`` s for a joint graph and a recompute set.

    Returns ``(forward, backward, saved_names)``.
    """
    gm = joint.gm if isinstance(joint, JointGraph) else joint
    if num_fwd_outputs is None:
        num_fwd_outputs = joint.num_fwd_outputs
    saved = required_saved(gm, recompute)
    try:
        with keep_random_ops():
            fwd, bwd = extract_fwd_bwd_modules(
                gm, saved_values=list(saved), saved_sym_nodes=[], num_fwd_outputs=num_fwd_outputs
            )
    except Exception as e:
        raise PlanInfeasible(
            f"cannot build the backward graph from the saved values "
            f"{[n.name for n in saved][:8]}...: {e}. A recomputed value's inputs must be "
            "saved or recomputed."
        ) from e
    bwd = recompute_just_in_time(bwd, forward_node_names(gm))
    fwd.graph.lint()
    bwd.graph.lint()
    saved_names = [n.name for n in bwd.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    return fwd, bwd, saved_names


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


def recompute_just_in_time(bwd: fx.GraphModule, forward_names: set[str]) -> fx.GraphModule:
    """Reorder ``bwd`` so each recomputed forward node runs right before its first user.

    Backward nodes keep their order; a recomputed node (one whose name is a forward
    node of the joint graph) is emitted when the first backward node that needs it,
    directly or through other recomputed nodes, is emitted.
    """
    graph = bwd.graph
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        env[node] = new.node_copy(node, lambda x: env[x])
    roots = [n for n in graph.nodes if n.op != "placeholder" and n.name not in forward_names]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in emit_just_in_time(roots, set(placeholders), order):
        env[node] = new.node_copy(node, lambda x: env[x])
    return fx.GraphModule(bwd, new)
