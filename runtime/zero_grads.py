"""Backward without zero gradients for the outputs the loss does not flow through.

When the model returns its loss (:func:`planner.zero_tangents.skips_zero_tangents`),
:func:`skip_zero_grads` tells the autograd function of each compiled step not to
turn a missing output gradient into a zero tensor (what its
``ctx.set_materialize_grads(False)`` would do), and :func:`accept_missing_tangents`
makes the backward graph take ``None`` for it: a tangent whose only use is an
``add`` (:func:`planner.zero_tangents.skippable_tangents`) is skipped there, as
eager autograd does (the other operand used as the sum, or copied into its layout);
any other tangent becomes the zeros the engine would have
made, before backward's first op, which is when the engine made them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from profiles._torch_private import is_compiled_function_node

__all__ = ["skip_zero_grads", "accept_missing_tangents", "add_unless_none", "add_or_copy", "zeros_if_none"]

#: Autograd nodes walked from an output to its compiled function at most (views
#: AOTAutograd regenerates outside the function lie between them).
_MAX_WALK = 4


def add_unless_none(a, b):
    """``a + b`` (``aten.add.Tensor``), or the one that is not ``None``."""
    if a is None:
        return b
    if b is None:
        return a
    return torch.ops.aten.add.Tensor(a, b)


def add_or_copy(a, b, size, stride):
    """``a + b`` (``aten.add.Tensor``), or a copy of the one that is not ``None`` with
    the sum's ``size`` and ``stride``."""
    if a is not None and b is not None:
        return torch.ops.aten.add.Tensor(a, b)
    x = b if a is None else a
    return torch.empty_strided(size, stride, dtype=x.dtype, device=x.device).copy_(x)


def zeros_if_none(t, size, stride, dtype, device):
    """``t``, or the zero gradient the autograd engine makes for a missing one."""
    if t is not None:
        return t
    return torch.empty_strided(size, stride, dtype=dtype, device=device).zero_()


def accept_missing_tangents(bwd: fx.GraphModule, skippable: dict[str, tuple[str, str, bool]]) -> fx.GraphModule:
    """Rewrite ``bwd`` (in place; returned) to take ``None`` for any tangent: each
    ``skippable`` tangent's ``add`` becomes :func:`add_unless_none` (or :func:`add_or_copy`
    where the sum's strides are not the operand's), every other
    tangent of a tensor passes through :func:`zeros_if_none` before backward's first op."""
    graph = bwd.graph
    nodes = {n.name: n for n in graph.nodes}
    placeholders = list(graph.find_nodes(op="placeholder"))
    for t in placeholders:
        if not t.name.startswith("tangents"):
            continue
        if t.name in skippable and skippable[t.name][0] in nodes:
            add = nodes[skippable[t.name][0]]
            if add.target is not torch.ops.aten.add.Tensor or add.kwargs:
                raise AssertionError(f"backward node {add.name} (the sum with {t.name}) was rewritten to {add.target} "
                                     "before tangents were made optional; arrange with skipped_tangents=")
            if skippable[t.name][2]:
                add.target = add_unless_none
            else:
                val = add.meta["val"]
                add.target, add.args = add_or_copy, (*add.args, tuple(val.shape), tuple(val.stride()))
            continue
        val = t.meta.get("val")
        if not isinstance(val, torch.Tensor) or not t.users:
            continue
        with graph.inserting_after(placeholders[-1]):
            z = graph.call_function(zeros_if_none, (t, tuple(val.shape), tuple(val.stride()), val.dtype, val.device))
        z.meta = dict(t.meta)
        t.replace_all_uses_with(z, delete_user_cb=lambda user: user is not z)
    graph.lint()
    bwd.recompile()
    return bwd


def skip_zero_grads(outputs, parameters) -> None:
    """Let the compiled function that made ``outputs`` (tensors, nested in lists,
    tuples, dicts or Hugging Face ``ModelOutput`` s) receive ``None`` for an output's
    missing gradient instead of zeros. Only a compiled function whose backward
    accumulates into one of ``parameters`` (the planned model's, as its forward
    sees them) is changed: not one upstream of an output that is a view of an input."""
    own = {id(p) for p in parameters if p.requires_grad}
    seen: set = set()
    todo = [(t.grad_fn, 0) for t in _tensors(outputs) if t.grad_fn is not None]
    while todo:
        node, depth = todo.pop()
        if node is None or node in seen or depth > _MAX_WALK:
            continue
        seen.add(node)
        if is_compiled_function_node(node):
            if any(id(getattr(fn, "variable", None)) in own for fn, _ in node.next_functions if fn is not None):
                node.materialize_grads = False
            continue
        todo.extend((fn, depth + 1) for fn, _ in node.next_functions if fn is not None)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict) or hasattr(obj, "values") and callable(obj.values):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
