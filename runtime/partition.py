"""Split a joint graph by save/recompute decisions into the forward and backward graphs the runtime runs.

The backward graph recomputes every forward value it needs that was not saved,
each just before its first use (the order the autograd engine would reach it), so
a recomputed value lives only as long as backward needs it. The solvers simulate
the same node orders without building the graphs (:func:`planner.schedule.fast_schedule`,
checked against this split by ``tests/test_schedule.py``).
"""

from __future__ import annotations

from typing import Iterable

import torch.fx as fx

from planner.schedule import emit_just_in_time, forward_node_names, required_saved
from profiles._torch_private import extract_fwd_bwd_modules, keep_random_ops, make_boxed
from profiles.joint import JointGraph

__all__ = ["split_joint", "recompute_just_in_time", "PlanInfeasible", "op_by_op"]


class PlanInfeasible(ValueError):
    """Decisions from which backward cannot get a value it needs."""


def split_joint(joint: JointGraph | fx.GraphModule, recompute: Iterable[str], *, num_fwd_outputs: int | None = None):
    """Forward and backward ``GraphModule`` s for a joint graph and a recompute set.

    Returns ``(forward, backward, saved_names)``. Raises :class:`PlanInfeasible`
    naming the gradient when the saved values and the tangents cannot produce it.
    """
    gm = joint.gm if isinstance(joint, JointGraph) else joint
    if num_fwd_outputs is None:
        num_fwd_outputs = joint.num_fwd_outputs
    saved = required_saved(gm, recompute)
    _check_gradients_computable(gm, saved, num_fwd_outputs)
    with keep_random_ops():
        fwd, bwd = extract_fwd_bwd_modules(gm, saved_values=list(saved), saved_sym_nodes=[], num_fwd_outputs=num_fwd_outputs)
    bwd = recompute_just_in_time(bwd, forward_node_names(gm))
    fwd.graph.lint()
    bwd.graph.lint()
    saved_names = [n.name for n in bwd.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    return fwd, bwd, saved_names


def _check_gradients_computable(gm: fx.GraphModule, saved: list[fx.Node], num_fwd_outputs: int) -> None:
    """:class:`PlanInfeasible` when a gradient the joint graph returns cannot be
    computed from ``saved``, the tangents and constants (what the backward graph receives)."""
    available = set(saved)
    for n in gm.graph.nodes:
        if (n.op == "placeholder" and n.name.startswith("tangents")) or n.op == "get_attr":
            available.add(n)
        elif n.op == "call_function" and all(a in available for a in n.all_input_nodes):
            available.add(n)
    out = gm.graph.output_node().args[0]
    grads = list(out[num_fwd_outputs:]) if isinstance(out, (list, tuple)) else []
    for g in grads:
        if isinstance(g, fx.Node) and g not in available:
            missing = sorted({a.name for a in g.all_input_nodes if a not in available})
            raise PlanInfeasible(
                f"the backward graph cannot compute gradient {g.name}: it needs {missing[:8]}, which are neither saved "
                f"nor computable from the saved values {[n.name for n in saved][:8]}; a recomputed value's inputs "
                "must be saved or recomputed"
            )


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


def op_by_op(gm: fx.GraphModule, example_inputs) -> object:
    """AOTAutograd's forward and backward compiler that runs a split graph as it is,
    one aten op at a time (boxed: it frees its inputs as it goes)."""
    return make_boxed(gm)
