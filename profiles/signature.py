"""Identify what a plan was made for, and say how a model or its inputs differ from it.

A plan records the joint graph's fingerprint (:func:`graph_fingerprint`: structure
*and* shapes), a size-independent structural fingerprint (the same graph
at another batch size or sequence length has the same one), a short digest per
joint-graph node (to name the first node that differs), the model's parameters and
buffers (names, shapes, dtypes) and the example inputs' shapes. The runtime checks
a model and its inputs against these before and while compiling.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from ._torch_private import tree_leaves
from .nodes import module_path

__all__ = [
    "graph_fingerprint",
    "structure_fingerprint",
    "node_digests",
    "first_difference",
    "parameter_signature",
    "parameter_mismatch",
    "describe_inputs",
    "check_input_devices",
]


def _node_line(node: fx.Node, *, shapes: bool) -> str:
    metas = []
    for t in tree_leaves(node.meta.get("val")):
        if isinstance(t, torch.Tensor):
            metas.append(f"{tuple(t.shape)}:{t.dtype}" if shapes else str(t.dtype))
    args = ",".join(a.name for a in node.all_input_nodes)
    return f"{node.name}|{node.op}|{node.target}|{args}|{';'.join(metas)}"


def _fingerprint(gm: fx.GraphModule, num_fwd_outputs: int, *, shapes: bool) -> str:
    h = hashlib.sha256(f"fwd_outputs={num_fwd_outputs}".encode())
    for node in gm.graph.nodes:
        h.update((_node_line(node, shapes=shapes) + "\n").encode())
    return h.hexdigest()[:16]


def graph_fingerprint(gm: fx.GraphModule, num_fwd_outputs: int) -> str:
    """A hash of the joint graph's structure: node names, ops, arguments, shapes and dtypes."""
    return _fingerprint(gm, num_fwd_outputs, shapes=True)


def structure_fingerprint(gm: fx.GraphModule, num_fwd_outputs: int) -> str:
    """Like :func:`graph_fingerprint` without the shapes: equal for the same model at
    another batch size or sequence length when the graph keeps its nodes (dtypes
    still count)."""
    return _fingerprint(gm, num_fwd_outputs, shapes=False)


def node_digests(gm: fx.GraphModule) -> list[str]:
    """Six hex digits per joint-graph node (name, op, arguments, shapes, dtypes), in order."""
    return [hashlib.sha256(_node_line(n, shapes=True).encode()).hexdigest()[:6] for n in gm.graph.nodes]


def _where(node: fx.Node) -> str:
    mod = module_path(node)
    target = str(node.target) if node.op == "call_function" else node.op
    shapes = [tuple(t.shape) for t in tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)]
    shape = f", shape {shapes[0] if len(shapes) == 1 else shapes}" if shapes else ""
    return f"{node.name!r} ({target}{' in ' + mod if mod else ''}{shape})"


def first_difference(gm: fx.GraphModule, digests: list[str] | None) -> str:
    """Words naming the first node of ``gm`` that differs from the graph ``digests``
    describe; "" when the digests are unknown or all nodes agree."""
    if not digests:
        return ""
    nodes = list(gm.graph.nodes)
    for i, (node, want) in enumerate(zip(nodes, node_digests(gm))):
        if i >= len(digests):
            break
        if digests[i] != want:
            return f"first differing node: #{i} {_where(node)} differs from the planned graph's node #{i}"
    if len(nodes) != len(digests):
        return f"the planned graph has {len(digests)} nodes, this one {len(nodes)}"
    return ""


def parameter_signature(model: torch.nn.Module) -> list[list]:
    """``[name, shape, dtype, requires_grad]`` per parameter, then ``[name, shape, dtype, None]`` per buffer."""
    out: list[list] = []
    for name, p in model.named_parameters():
        out.append([name, list(p.shape), str(p.dtype).replace("torch.", ""), bool(p.requires_grad)])
    for name, b in model.named_buffers():
        out.append([name, list(b.shape), str(b.dtype).replace("torch.", ""), None])
    return out


def parameter_mismatch(model: torch.nn.Module, planned: Sequence | None) -> str:
    """Words naming the first parameter or buffer of ``model`` that differs from
    ``planned`` (a :func:`parameter_signature`, its lists or tuples); "" when they agree
    or none was recorded."""
    if not planned:
        return ""
    got = parameter_signature(model)
    for i, (g, w) in enumerate(zip(got, planned)):
        g, w = list(g), [list(v) if isinstance(v, tuple) else v for v in w]  # shapes as lists, like ``g``'s
        if g != w:
            if g[0] != w[0]:
                return f"parameter #{i} is {g[0]!r}, the planned model's is {w[0]!r}"
            what = {1: "shape", 2: "dtype", 3: "requires_grad"}
            k = next(j for j in (1, 2, 3) if g[j] != w[j])
            return f"{g[0]!r} has {what[k]} {g[k]}, the planned model's has {w[k]}"
    if len(got) != len(planned):
        extra = got[len(planned)] if len(got) > len(planned) else planned[len(got)]
        return (
            f"the model has {len(got)} parameters and buffers, the planned model {len(planned)} "
            f"(first unmatched: {extra[0]!r})"
        )
    return ""


def describe_inputs(args: Iterable[Any], kwargs: dict) -> list:
    """``[name, shape, dtype]`` per input (position or keyword); ``[name, None, type]`` for non-tensors."""
    out = []
    items = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, a in items:
        if isinstance(a, torch.Tensor):
            out.append([name, list(a.shape), str(a.dtype).replace("torch.", "")])
        else:
            out.append([name, None, type(a).__name__])
    return out


def check_input_devices(model: torch.nn.Module, args: Iterable[Any], kwargs: dict, *, allow_meta: bool) -> None:
    """Raise ``ValueError`` naming the first input tensor on another device than the
    model's parameters. With ``allow_meta`` (planning, see :mod:`profiles.meta`) meta
    tensors on either side are accepted; a training step cannot run on them."""
    param = next(iter(model.parameters()), None)
    if param is None:
        return
    device = param.device
    items = [(f"input #{i}", a) for i, a in enumerate(args)] + [(f"input {k!r}", a) for k, a in kwargs.items()]
    for name, a in items:
        for t in tree_leaves(a):
            if not isinstance(t, torch.Tensor) or t.device == device:
                continue
            if allow_meta and "meta" in (t.device.type, device.type):
                continue
            raise ValueError(
                f"{name} is on {t.device} but the model's parameters are on {device}; "
                f"move the inputs with .to({str(device)!r}) (or the model with model.to(...)) first"
            )
