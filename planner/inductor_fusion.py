"""Which values of a split graph Inductor never allocates, and which kernels write over an input.

Compiled with ``realize_reads_threshold=0`` (the option a plan for a graph that
convolves on the CPU is compiled with, :mod:`planner.inductor_layout`), Inductor
stores every value read by several kernels once, and generates a pointwise value
read by a single kernel inside that kernel: it is never allocated, and the
values it is computed from stay alive until that kernel runs. :func:`fused_graph`
says which values those are in one graph (forward or backward, as split): a value
computed by a pointwise op (``torch.Tag.pointwise``) into a buffer of its own, not
returned by the graph, whose only reader (through its views) is a pointwise op or
a reduction. Its views are not allocated either.

A kernel Inductor generates (not a library kernel, :func:`planner.executor.is_extern`)
whose input dies at it and has the size of its output writes the output into that
input's buffer ("# reuse" in Inductor's generated code): the simulator frees that
input before it allocates the output (:func:`writes_over_input`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import torch

from profiles.graph_profile import NodeInfo

from .executor import is_extern
from .schedule import GraphOrder

__all__ = ["FusedGraph", "fused_graph", "is_pointwise", "writes_over_input"]

#: Reductions (aten overload packets) a fused pointwise value may be read by.
_REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "var_mean", "var", "prod", "max", "min", "argmax", "argmin",
                         "any", "all"})


@lru_cache(maxsize=None)
def is_pointwise(op: str) -> bool:
    """Whether operator ``op`` (e.g. ``aten.add.Tensor``) is an out-of-place aten or
    prims op tagged ``torch.Tag.pointwise``."""
    parts = op.split(".")
    if len(parts) < 2 or parts[0] not in ("aten", "prims") or parts[1].endswith("_"):
        return False
    packet = getattr(getattr(torch.ops, parts[0]), parts[1], None)
    overload = getattr(packet, parts[2] if len(parts) > 2 else "default", None) if packet is not None else None
    return overload is not None and torch.Tag.pointwise in overload.tags


def _reads_fused(op: str) -> bool:
    parts = op.split(".")
    return is_pointwise(op) or (len(parts) >= 2 and parts[0] in ("aten", "prims") and parts[1] in _REDUCTIONS)


@dataclass(frozen=True, slots=True)
class FusedGraph:
    """One graph as Inductor runs it, for the simulator."""

    #: Nodes generated inside their reader's kernel (values and their views): never allocated.
    inlined: frozenset[str]
    #: Per node, the values its kernel reads: its inputs, an inlined one replaced by what it reads.
    inputs: Mapping[str, tuple[str, ...]]


def _views(info: Mapping[str, NodeInfo], order: GraphOrder) -> dict[str, str]:
    """Per view (a node that allocates nothing and refers to an input's storages), the value it views."""
    known = {name for name, _, _ in order.nodes}
    base: dict[str, str] = {}
    for name, op, inputs in order.nodes:
        mine = info[name].storages
        if op != "call_function" or not mine or info[name].bytes:
            continue
        for a in inputs:
            if a in known and set(mine) <= set(info[a].storages):
                base[name] = base.get(a, a)
                break
    return base


def fused_graph(info: Mapping[str, NodeInfo], order: GraphOrder) -> FusedGraph:
    """The values of graph ``order`` Inductor generates inside their one reader (see the module docstring)."""
    outputs = set(order.outputs)
    readers: dict[str, set[str]] = {name: set() for name, _, _ in order.nodes}
    for name, _, inputs in order.nodes:
        for a in inputs:
            if a in readers:
                readers[a].add(name)
    base = _views(info, order)
    views: dict[str, list[str]] = {}
    for view, value in base.items():
        views.setdefault(value, []).append(view)
    inlined: set[str] = set()
    for name, op, _ in order.nodes:
        ni = info[name]
        if op != "call_function" or name in base or len(ni.storages) != 1 or not ni.bytes or not is_pointwise(ni.op):
            continue
        group = {name, *views.get(name, ())}
        consumers = set().union(*(readers[g] for g in group)) - group
        if group & outputs or len(consumers) != 1:
            continue
        (reader,) = consumers
        if reader not in base and _reads_fused(info[reader].op):
            inlined |= group
    expanded: dict[str, tuple[str, ...]] = {}
    for name, _, inputs in order.nodes:
        reads: list[str] = []
        for a in inputs:
            reads.extend(expanded[a] if a in inlined else (a,))
        expanded[name] = tuple(dict.fromkeys(reads))
    return FusedGraph(inlined=frozenset(inlined), inputs=expanded)


def writes_over_input(info: Mapping[str, NodeInfo], name: str, storages: tuple[int, ...],
                      dying: list[tuple[str, tuple[int, ...]]], sizes: list[int], refs: Mapping[int, int]) -> str | None:
    """The input whose buffer node ``name`` (allocating ``storages``) writes its output
    into, or None: for a kernel Inductor generates with one output, the first of
    ``dying`` (``(input, its storages)`` of the inputs whose last reader it is) held
    by nothing else (``refs``: references per live storage) whose one buffer has the
    output's size (``sizes``: per storage id)."""
    ni = info[name]
    if len(storages) != 1 or not ni.bytes or is_extern(ni.op):
        return None
    for a, theirs in dying:
        if len(theirs) == 1 and refs.get(theirs[0], 0) == 1 and sizes[theirs[0]] == sizes[storages[0]]:
            return a
    return None
