"""Copies eager PyTorch does not make: a same-layout ``clone`` of an intermediate value, used as the value.

AOTAutograd's graphs are functional, so an op that eager PyTorch runs as "return the
input" is traced as a copy: ``dropout`` with ``p=0`` in training (a model configured
without dropout, an attention dropout of 0.0) decomposes to ``clone``, where eager's
``at::dropout`` returns its input. Each such copy is a buffer eager does not
allocate, and is often what forward saves for backward (attention probabilities
saved twice: by the softmax and, as the copy, by the matmul after it).
:func:`drop_same_layout_clones` reads the value itself wherever the copy was read,
when that computes the same numbers and aliases nothing a caller sees: a ``clone``
that keeps the layout (no ``memory_format`` other than ``preserve_format``, the copy's
strides equal to the value's) of a value computed in the graph (not an input: a
caller may change an input between forward and backward), whose storage no output
of the graph shares (an output of forward, or a gradient, must not alias another one
or an intermediate). Views of the copy keep their recorded values; their
``meta["storage_keys"]`` (which :func:`profiles.graph_profile.profile_graph` reads
before the values' own storages) name the value's storage instead.
"""

from __future__ import annotations

import torch
from torch import fx

from ._torch_private import storage_key
from .nodes import value_tensors

__all__ = ["drop_same_layout_clones"]

_CLONE = torch.ops.aten.clone.default


def _same_layout_copy(node: fx.Node) -> bool:
    if node.kwargs.get("memory_format", torch.preserve_format) is not torch.preserve_format or len(node.args) != 1:
        return False
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_function" or len(value_tensors(src)) != 1:
        return False
    a, b = src.meta.get("val"), node.meta.get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and a.stride() == b.stride())


def _keys(node: fx.Node) -> list:
    """The storage key of each tensor ``node`` makes, as the profile will read them."""
    return list(node.meta.get("storage_keys") or [storage_key(t) for t in value_tensors(node)])


def drop_same_layout_clones(gm: fx.GraphModule) -> int:
    """Replace each same-layout ``clone`` of joint graph ``gm`` that no output of the
    graph aliases by its input, and name the input's storage where a view of the
    copy named the copy's (in place; recompiled when changed). Returns how many were dropped."""
    clones = [n for n in gm.graph.find_nodes(op="call_function", target=_CLONE)
              if _same_layout_copy(n) and not any(u.op == "output" for u in n.users)]
    if not clones:
        return 0
    keys = {n: _keys(n) for n in gm.graph.nodes}
    sharing: dict = {}  # storage key -> the nodes whose tensors refer to it
    for n, ks in keys.items():
        for k in ks:
            sharing.setdefault(k, []).append(n)
    out = gm.graph.output_node().args[0]
    held = {k for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, fx.Node) for k in keys[o]}
    dropped = 0
    for node in clones:
        (key,) = keys[node]
        if key in held:
            continue
        (into,) = keys[node.args[0]]
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        for other in sharing.pop(key, ()):  # views of the copy (and views of those) share its storage
            if other is not node:
                keys[other] = [into if k == key else k for k in keys[other]]
                other.meta["storage_keys"] = keys[other]
                sharing.setdefault(into, []).append(other)
        dropped += 1
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return dropped
