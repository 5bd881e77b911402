"""Cut a joint graph captured with a few layers of a stack into per-layer periods,
and check that the layers repeat.

In forward, layer ``c``'s period runs from its first operator to the next layer's
first; in backward (which runs the layers in reverse), from layer ``c``'s first
operator to layer ``c-1``'s. What precedes the layers (embeddings, masks), the
last layer's forward with what follows it (head, loss), the backward before the
last layer's, and layer 0's backward with what follows it are kept once
(:class:`Periods`). Every node of a period refers to nodes of its own or a
neighbouring layer's period at a fixed position, to a parameter of its layer, or
to a node kept once; :func:`check_periodic` requires layers 1 and 2 to refer
alike and all periods of a phase to hold the same operators. :func:`name_steps`
reads how fx's node numbers move from one layer to the next.
:mod:`profiles.repeat_capture` builds the deep graph from these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ._torch_private import tree_leaves
from .nodes import module_path

__all__ = ["CAPTURED", "BACKWARD", "NotPeriodic", "Periods", "cut_periods", "check_periodic", "is_constant",
           "name_steps", "name_stem"]

#: Layers of the stack the model is captured with.
CAPTURED = 4
#: ``partitioner_tag`` of a backward node.
BACKWARD = "is_backward"


class NotPeriodic(Exception):
    """The captured layers are not copies of one another in the joint graph."""


@dataclass(slots=True)
class Periods:
    """The captured graph cut into periods (see the module docstring)."""

    #: Per node: its chunk kind and layer. Kinds: ``P`` (before the layers), ``F``
    #: (a forward period), ``EF`` (last layer's forward and what follows), ``S``
    #: (backward before the last layer's), ``B`` (a backward period), ``EB``
    #: (layer 0's backward and what follows), ``param`` (a layer's parameter or
    #: buffer), ``ph`` (another placeholder). Layer -1 for kinds kept once.
    where: dict[fx.Node, tuple[str, int]] = field(default_factory=dict)
    #: Per node of a chunk: its position in the chunk.
    pos: dict[fx.Node, int] = field(default_factory=dict)
    #: The nodes of each chunk ``(kind, layer)``, in graph order.
    chunks: dict[tuple[str, int], list[fx.Node]] = field(default_factory=dict)
    #: Layer parameters: the dotted name within the layer of each, in group order.
    suffixes: list[str] = field(default_factory=list)

    def add(self, node: fx.Node, kind: str, layer: int) -> None:
        chunk = self.chunks.setdefault((kind, layer), [])
        self.where[node], self.pos[node] = (kind, layer), len(chunk)
        chunk.append(node)


def _layer_of(node: fx.Node, pattern: re.Pattern) -> int | None:
    m = pattern.match(module_path(node))
    return int(m.group(1)) if m else None


def _cut_placeholders(cut: Periods, gm: fx.GraphModule, primal_names: list[str], stack_path: str) -> None:
    pattern = re.compile(rf"^{re.escape(stack_path)}\.(\d+)\.(.+)$")
    groups: dict[int, list[str]] = {}
    layer_slots = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        m = pattern.match(primal_names[i]) if i < len(primal_names) else None
        if m is None:
            cut.add(node, "ph", -1)
            continue
        c = int(m.group(1))
        groups.setdefault(c, []).append(m.group(2))
        layer_slots.append((i, c))
        cut.add(node, "param", c)
    k = CAPTURED
    if sorted(groups) != list(range(k)) or any(groups[c] != groups[0] for c in groups):
        raise NotPeriodic("the layers' parameters are not the same names in each layer")
    first, size = layer_slots[0][0], len(groups[0])
    want = [(first + c * size + j, c) for c in range(k) for j in range(size)]
    if layer_slots != want:
        raise NotPeriodic("the layers' parameters are not passed to the graph layer by layer")
    cut.suffixes = groups[0]


def _cut_phase(cut: Periods, nodes: list[fx.Node], pattern: re.Pattern, backward: bool) -> None:
    """Cut one phase's nodes into chunks: forward P, F_0..F_{k-2}, EF; backward S, B_{k-1}..B_1, EB."""
    k = CAPTURED
    layers = [_layer_of(n, pattern) for n in nodes]
    start = {c: layers.index(c) for c in range(k) if c in layers}
    if len(start) != k:
        raise NotPeriodic(f"not every captured layer has {'backward' if backward else 'forward'} operators")
    order = [start[c] for c in (reversed(range(k)) if backward else range(k))]
    if order != sorted(order):
        raise NotPeriodic("the layers do not run one after another")
    for i, (node, layer) in enumerate(zip(nodes, layers)):
        if i < order[0]:
            kind, c = ("S", -1) if backward else ("P", -1)
        elif i >= order[-1]:
            kind, c = ("EB", 0) if backward else ("EF", k - 1)
        else:
            j = max(j for j, s in enumerate(order) if s <= i)
            kind, c = ("B", k - 1 - j) if backward else ("F", j)
        if layer is not None and layer != c:
            raise NotPeriodic(f"node {node.name} of layer {layer} runs inside layer {c}'s operators")
        if kind in ("F", "B") and node.op != "call_function" and not is_constant(node):
            raise NotPeriodic(f"node {node.name} ({node.op}) inside a layer cannot be repeated")
        cut.add(node, kind, c)


def cut_periods(gm: fx.GraphModule, primal_names: list[str], stack_path: str) -> Periods:
    """``gm``'s nodes by period; ``primal_names`` name its primals (the stack's layers: ``stack_path.<i>.``)."""
    cut = Periods()
    _cut_placeholders(cut, gm, primal_names, stack_path)
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    fwd = [n for n in body if n.meta.get("partitioner_tag") != BACKWARD]
    bwd = [n for n in body if n.meta.get("partitioner_tag") == BACKWARD]
    if body != fwd + bwd:
        raise NotPeriodic("forward and backward operators are interleaved")
    pattern = re.compile(rf"^{re.escape(stack_path)}\.(\d+)(?:\.|$)")
    _cut_phase(cut, fwd, pattern, backward=False)
    _cut_phase(cut, bwd, pattern, backward=True)
    return cut


_CONSTANT = re.compile(r"_tensor_constant(\d+)")


def is_constant(node: fx.Node) -> bool:
    """A tensor constant AOTAutograd lifted into the graph module (numbered in tracing order)."""
    return node.op == "get_attr" and bool(_CONSTANT.fullmatch(str(node.target)))


def _target(node: fx.Node) -> str:
    return "constant" if is_constant(node) else str(node.target)


def _shape_line(node: fx.Node) -> str:
    return ";".join(f"{tuple(t.shape)}:{t.dtype}:{t.stride()}" if isinstance(t, torch.Tensor) else repr(t)
                    for t in tree_leaves(node.meta.get("val")))


def _ref(cut: Periods, y: fx.Node, c: int) -> tuple:
    kind, cy = cut.where[y]
    if cy < 0:
        return ("once", y.name)
    return (kind, cy - c, cut.pos[y])


def _signature(cut: Periods, node: fx.Node, c: int) -> tuple:
    """The node's operator, shapes and arguments, with references relative to layer ``c``."""
    args = fx.node.map_arg((node.args, node.kwargs), lambda y: _ref(cut, y, c))  # type: ignore[arg-type]
    return (node.op, _target(node), _shape_line(node), repr(args))


def check_periodic(gm: fx.GraphModule, cut: Periods) -> None:
    """Raise :class:`NotPeriodic` unless layers 1 and 2 refer alike (their constants equal) and all
    periods of a phase hold the same operators."""
    k = CAPTURED
    for kind, layers in (("F", range(0, k - 1)), ("B", range(1, k))):
        ops = {c: [(_target(n), _shape_line(n)) for n in cut.chunks[(kind, c)]] for c in layers}
        if any(ops[c] != ops[layers[0]] for c in layers):
            raise NotPeriodic(f"the layers' {'forward' if kind == 'F' else 'backward'} operators differ")
        one = [_signature(cut, n, 1) for n in cut.chunks[(kind, 1)]]
        two = [_signature(cut, n, 2) for n in cut.chunks[(kind, 2)]]
        if one != two:
            at = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
            raise NotPeriodic(f"layer 2's node {cut.chunks[(kind, 2)][at].name} is not layer 1's "
                              f"{cut.chunks[(kind, 1)][at].name} one layer on")
        for a, b in zip(cut.chunks[(kind, 1)], cut.chunks[(kind, 2)]):
            if is_constant(a) and not _same_tensor(getattr(gm, a.target), getattr(gm, b.target)):
                raise NotPeriodic(f"layers 1 and 2 hold different constants ({a.target}, {b.target})")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def name_stem(node: fx.Node) -> tuple[str, int]:
    """A node's name as fx makes it: a stem and the count of earlier nodes of that stem (``mm_5``: ``mm``, 5)."""
    m = _CONSTANT.fullmatch(str(node.target)) if is_constant(node) else None
    if m:
        return "_tensor_constant", int(m.group(1))
    m = re.fullmatch(r"(.+?)_(\d+)", node.name)
    return (m.group(1), int(m.group(2))) if m else (node.name, 0)


def name_steps(cut: Periods) -> dict[str, dict[str, int]]:
    """Per phase ("F", "B") and name stem: how far the stem's numbers move from one
    layer's period to the next. Tracing names nodes it later drops too, so this is
    read from the periods rather than counted."""
    k = CAPTURED
    steps: dict[str, dict[str, int]] = {"F": {}, "B": {}}
    pairs = {"F": [(c, c + 1) for c in range(k - 2)], "B": [(c + 1, c) for c in range(1, k - 1)]}
    for kind, layer_pairs in pairs.items():
        for early, late in layer_pairs:
            for a, b in zip(cut.chunks[(kind, early)], cut.chunks[(kind, late)]):
                (base, x), (base_b, y) = name_stem(a), name_stem(b)
                if base != base_b or steps[kind].setdefault(base, y - x) != y - x:
                    raise NotPeriodic(f"the names of {a.name} and {b.name} do not move by one layer's count")
    return steps
