"""Map a per-block FSDP2 plan's decisions onto each block's own compiled joint graph.

A plan made with ``fsdp_wrap="blocks"`` names the nodes of the one-graph joint
capture of the whole step. The per-block runtime (:mod:`runtime.block_runtime`)
compiles each block on its own, so each block's joint graph has its own node
names. The ``i``-th forward call_function node of block ``path`` in the one graph
(its module path ``path`` or below it, in run order) corresponds to the ``i``-th
forward call_function node of the block's own joint graph; their operators and
output shapes must agree (:class:`BlockMismatch` names the first that differs).
Only forward values' save/recompute decisions carry over: the block's backward is
its own graph's.

:func:`planned_blocks` captures the one graph again at apply time, on inputs of the
planned shapes (zeros; two inputs that were one tensor become two, so the
fingerprint may differ), and checks that each value the plan decides on inside a
block is the same node (name, operator, module) there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from planner.plan_type import Plan
from planner.schedule import forward_node_names
from profiles.autocast_state import under_autocast
from profiles.capture import capture
from profiles.nodes import module_path, op_name, value_tensors

from .mismatch import PlanMismatch

__all__ = ["BlockMismatch", "PlannedNode", "planned_blocks", "block_recompute", "node_shapes"]


class BlockMismatch(PlanMismatch):
    """A block's own joint graph differs from the block's nodes in the plan's one-graph capture."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannedNode:
    """One forward call_function node of a block in the plan's one-graph capture."""

    #: Its name in the one graph (the plan's decisions are keyed by it).
    name: str
    #: Its operator, e.g. ``aten.mm.default``.
    op: str
    #: ``(shape, dtype)`` of each tensor it returns.
    shapes: tuple[tuple[tuple[int, ...], str], ...]


def node_shapes(node: fx.Node) -> tuple[tuple[tuple[int, ...], str], ...]:
    """``(shape, dtype)`` of each tensor ``node`` returns (from its fake value)."""
    return tuple((tuple(int(s) for s in t.shape), str(t.dtype)) for t in value_tensors(node))


def _inputs(model: torch.nn.Module, plan: Plan) -> tuple[tuple, dict]:
    """Zeros of the planned input shapes and dtypes, on the model's device, as positional and keyword arguments."""
    if not plan.model.inputs:
        raise BlockMismatch("this plan records no input shapes: plan again with planner.plan(model, budget_gb, inputs)")
    device = next(iter(model.parameters())).device
    args, kwargs = [], {}
    for name, shape, dtype in plan.model.inputs:
        if shape is not None:
            value = torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
        elif dtype == "NoneType":
            value = None
        else:
            raise BlockMismatch(
                f"the planned input {name!r} is a {dtype}, which the per-block runtime cannot rebuild to capture the "
                "planned graph: pass it as a tensor or leave it out of the planned call"
            )
        if name.isdigit():
            args.append(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def planned_blocks(model: torch.nn.Module, plan: Plan) -> dict[str, tuple[PlannedNode, ...]]:
    """Each of ``plan``'s blocks' forward call_function nodes in the one-graph capture, in run order.

    Captures ``model``'s step on zeros of the planned input shapes; raises
    :class:`BlockMismatch` when a value the plan decides on inside a block is another node there."""
    args, kwargs = _inputs(model, plan)
    if args and kwargs:
        raise BlockMismatch("the planned call has both positional and keyword inputs, which the per-block runtime "
                            "cannot rebuild: plan a call with only one kind")
    with under_autocast(plan.model.autocast):
        joint = capture(model, kwargs if kwargs else args, dropout=plan.dropout)
    forward = forward_node_names(joint.gm)
    paths = plan.distributed.fsdp_blocks
    out: dict[str, list[PlannedNode]] = {p: [] for p in paths}
    found: dict[str, tuple[str, str]] = {}
    for node in joint.gm.graph.nodes:
        if node.name not in forward:
            continue
        mod = module_path(node)
        found[node.name] = (op_name(node), mod)
        p = _block_of(mod, paths)
        if p is not None:
            out[p].append(PlannedNode(name=node.name, op=str(node.target), shapes=node_shapes(node)))
    _check_names(plan, found)
    return {p: tuple(v) for p, v in out.items()}


def _block_of(module: str, paths) -> str | None:
    """The block of ``paths`` that module path ``module`` is, or is inside; None if none."""
    return next((p for p in paths if module == p or module.startswith(p + ".")), None)


def _check_names(plan: Plan, found: dict[str, tuple[str, str]]) -> None:
    """:class:`BlockMismatch` unless every value the plan decides on inside a block is
    the same node (name, operator, module) in the graph captured again."""
    for d in plan.nodes:
        if _block_of(d.module, plan.distributed.fsdp_blocks) is None:
            continue
        if found.get(d.name) != (d.op, d.module):
            raise BlockMismatch(
                f"the plan's node {d.name!r} ({d.op} in {d.module}) is {found.get(d.name, 'missing')} in this model's "
                "graph captured at the planned shapes: the model changed since it was planned, or its forward "
                "depends on its inputs' values; plan again with planner.plan(model, budget_gb, inputs, fsdp_wrap='blocks')"
            )


def block_recompute(path: str, planned: tuple[PlannedNode, ...], gm: fx.GraphModule, recomputed: frozenset[str]) -> frozenset[str]:
    """The nodes of block ``path``'s own joint graph ``gm`` to recompute: those whose
    counterpart in ``planned`` the plan recomputes (``recomputed``: one-graph names).
    :class:`BlockMismatch` names the first forward node whose operator or shapes differ."""
    forward = forward_node_names(gm)
    own = [n for n in gm.graph.nodes if n.name in forward]
    for i, (p, n) in enumerate(zip(planned, own)):
        if p.op != str(n.target) or p.shapes != node_shapes(n):
            raise BlockMismatch(
                f"block {path!r} compiled on its own differs from the plan's graph at its forward node #{i}: "
                f"{n.name!r} ({n.target}, {node_shapes(n)}) where the plan has {p.name!r} ({p.op}, {p.shapes}); "
                "the inputs have other shapes than planned (a per-block plan runs its planned shapes only), the "
                "model changed since it was planned, or the block runs other operations when compiled alone than "
                "in the whole model's graph: plan again for these inputs with planner.plan(..., fsdp_wrap='blocks')"
            )
    if len(planned) != len(own):
        raise BlockMismatch(
            f"block {path!r} compiled on its own has {len(own)} forward nodes, the plan's graph {len(planned)}: "
            "plan again with planner.plan(..., fsdp_wrap='blocks')"
        )
    return frozenset(n.name for p, n in zip(planned, own) if p.name in recomputed)
