"""What one joint-graph node is, read from the node alone: the module that owns it,
its operator's name, whether running it again gives the same result, and its FLOPs.

FLOPs come from ``torch.utils.flop_counter``'s formulas, applied to the fake
tensors AOTAutograd leaves in ``node.meta["val"]``.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from ._torch_private import is_op_overload, is_random_op, op_is_mutable, tree_leaves, tree_map

__all__ = ["FlopCountError", "module_path", "clean_module_path", "value_tensors", "op_name", "is_recomputable", "node_flops"]


class FlopCountError(RuntimeError):
    """``torch.utils.flop_counter``'s formula for ``op`` raised on node ``node``'s
    arguments (the formula's error is ``__cause__``)."""

    def __init__(self, message: str, *, node: str, op: str):
        super().__init__(message)
        #: Name of the fx node whose FLOPs could not be counted.
        self.node = node
        #: The node's operator, e.g. ``aten.mm.default``.
        self.op = op


def module_path(node: fx.Node) -> str:
    """The owning module's dotted path, from dynamo's ``nn_module_stack`` metadata
    ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return clean_module_path(path)


def clean_module_path(path: str) -> str:
    """A module path as dynamo records it (``L['self'].transformer.h[3]``) in dotted form (``transformer.h.3``)."""
    # The root model as dynamo reached it: L['self'], or L['args'][0] when forward is
    # wrapped by a decorator taking (*args, **kwargs) (Hugging Face Llama).
    path = re.sub(r"^L(\['[^']+'\]|\[\d+\])+\.?", "", path)
    path = re.sub(r"^L__self___?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"(^|\.)_modules\.", ".", path)
    return path.strip(".")


def value_tensors(node: fx.Node) -> list:
    """The tensors ``node`` makes (its ``meta["val"]``), in order: the order a stitched or
    repeated graph's ``meta["storage_keys"]`` follows."""
    return [t for t in tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)]


def op_name(node: fx.Node) -> str:
    """``aten.mm.default`` for an operator call, ``getitem``, or the node's kind
    (``placeholder``, ``output``, ...)."""
    if node.op != "call_function":
        return node.op
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target)


def is_recomputable(node: fx.Node) -> bool:
    """False for nodes whose second run would differ from the first: random ops,
    ops that mutate an argument, higher-order ops and Python callables (kept as
    they ran), a ``getitem`` of any of these, and a region's output that later
    regions read (``meta["region_boundary"]``: :mod:`profiles.region_stitch`)."""
    target = node.target
    if node.op != "call_function":
        return True
    if node.meta.get("region_boundary"):
        return False
    if target is operator.getitem:
        return is_recomputable(node.args[0])
    if not is_op_overload(target):
        return False
    if is_random_op(target):
        return False
    return not op_is_mutable(target)


def node_flops(node: fx.Node) -> int:
    """FLOPs of one execution of ``node`` (0 for nodes without a FLOP formula).

    Raises :class:`FlopCountError` naming the op and node when the formula raises."""
    if node.op != "call_function" or not is_op_overload(node.target):
        return 0
    formula = flop_registry.get(node.target.overloadpacket)
    if formula is None:
        return 0

    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args = tree_map(val, node.args)
    kwargs = tree_map(val, node.kwargs)
    try:
        return int(formula(*args, **kwargs, out_val=node.meta.get("val")))
    except Exception as e:  # a formula is arbitrary Python: any error it raises is reported as this one
        raise FlopCountError(
            f"the FLOP formula of {node.target} raised on node {node.name!r}: {type(e).__name__}: {e}",
            node=node.name,
            op=str(node.target),
        ) from e
