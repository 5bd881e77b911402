"""The joint graph of a deep stack of identical layers, made from a capture of four.

Tracing a step through dynamo and AOTAutograd costs time in proportion to its
operators, and a deep model is mostly copies of one layer. So a model with a
:mod:`layer stack <profiles.layer_stack>` of ``L`` layers is captured with its
first :data:`CAPTURED` layers only, and the joint graph of all ``L`` is built
from that one: the same nodes, names, arguments and metadata that tracing the
whole model gives (``tests/test_repeat_capture.py`` compares the two).

The captured graph is cut into *periods*. In forward, layer ``c``'s period runs
from its first operator to the next layer's first; in backward (which runs the
layers in reverse), from layer ``c``'s first operator to layer ``c-1``'s. What
precedes the layers (embeddings, masks), the last layer's forward with what
follows it (head, loss), the backward before the last layer's and layer 0's
backward with what follows it are kept once. Every node of a period refers to
nodes of its own or a neighbouring layer's period at a fixed position, to a
parameter of its layer, or to a node kept once. When layers 1 and 2 refer
alike (and all periods hold the same operators), the stack is periodic and the
``L``-layer graph is the captured one with layer 1's periods repeated. Nodes are
created in the order tracing creates them, with the same name stems, so fx
numbers them as tracing does: rebuilding the captured graph itself this way must
give it back exactly, which is checked on every capture.

Whatever does not fit (layers that differ, a model returning each layer's
output, constants inside a layer) raises :class:`NotPeriodic`, and the caller
captures the whole model instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ._torch_private import storage_key, tree_leaves
from .joint import CaptureError
from .layer_stack import find_layer_stack, shortened
from .nodes import clean_module_path, module_path
from .signature import graph_fingerprint, node_digests

__all__ = ["CAPTURED", "MIN_DEPTH", "NotPeriodic", "repeat_layers", "record_repeated"]

#: Layers of the stack the model is captured with.
CAPTURED = 4
#: Stacks at least this deep are captured with :data:`CAPTURED` layers and repeated.
MIN_DEPTH = 8
_BACKWARD = "is_backward"
#: Offset between the autograd sequence numbers of two copies of a layer.
_SEQ_STRIDE = 1 << 20


class NotPeriodic(Exception):
    """The captured layers are not copies of one another in the joint graph."""


@dataclass(slots=True)
class _Cut:
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


def _cut_placeholders(cut: _Cut, gm: fx.GraphModule, primal_names: list[str], stack_path: str) -> None:
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


def _cut_phase(cut: _Cut, nodes: list[fx.Node], pattern: re.Pattern, backward: bool) -> None:
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
        if kind in ("F", "B") and node.op != "call_function" and not _is_constant(node):
            raise NotPeriodic(f"node {node.name} ({node.op}) inside a layer cannot be repeated")
        cut.add(node, kind, c)


def _cut(gm: fx.GraphModule, primal_names: list[str], stack_path: str) -> _Cut:
    cut = _Cut()
    _cut_placeholders(cut, gm, primal_names, stack_path)
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    fwd = [n for n in body if n.meta.get("partitioner_tag") != _BACKWARD]
    bwd = [n for n in body if n.meta.get("partitioner_tag") == _BACKWARD]
    if body != fwd + bwd:
        raise NotPeriodic("forward and backward operators are interleaved")
    pattern = re.compile(rf"^{re.escape(stack_path)}\.(\d+)(?:\.|$)")
    _cut_phase(cut, fwd, pattern, backward=False)
    _cut_phase(cut, bwd, pattern, backward=True)
    return cut


_CONSTANT = re.compile(r"_tensor_constant(\d+)")


def _is_constant(node: fx.Node) -> bool:
    """A tensor constant AOTAutograd lifted into the graph module (numbered in tracing order)."""
    return node.op == "get_attr" and bool(_CONSTANT.fullmatch(str(node.target)))


def _target(node: fx.Node) -> str:
    return "constant" if _is_constant(node) else str(node.target)


def _shape_line(node: fx.Node) -> str:
    return ";".join(f"{tuple(t.shape)}:{t.dtype}:{t.stride()}" if isinstance(t, torch.Tensor) else repr(t)
                    for t in tree_leaves(node.meta.get("val")))


def _ref(cut: _Cut, y: fx.Node, c: int) -> tuple:
    kind, cy = cut.where[y]
    if cy < 0:
        return ("once", y.name)
    return (kind, cy - c, cut.pos[y])


def _signature(cut: _Cut, node: fx.Node, c: int) -> tuple:
    """The node's operator, shapes and arguments, with references relative to layer ``c``."""
    args = fx.node.map_arg((node.args, node.kwargs), lambda y: _ref(cut, y, c))  # type: ignore[arg-type]
    return (node.op, _target(node), _shape_line(node), repr(args))


def _check_periodic(gm: fx.GraphModule, cut: _Cut) -> None:
    """Layers 1 and 2 refer alike, and all periods of a phase hold the same operators."""
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
            if _is_constant(a) and not _same_tensor(getattr(gm, a.target), getattr(gm, b.target)):
                raise NotPeriodic(f"layers 1 and 2 hold different constants ({a.target}, {b.target})")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def _stem(node: fx.Node) -> tuple[str, int]:
    """A node's name as fx makes it: a stem and the count of earlier nodes of that stem (``mm_5``: ``mm``, 5)."""
    m = _CONSTANT.fullmatch(str(node.target)) if _is_constant(node) else None
    if m:
        return "_tensor_constant", int(m.group(1))
    m = re.fullmatch(r"(.+?)_(\d+)", node.name)
    return (m.group(1), int(m.group(2))) if m else (node.name, 0)


def _steps(cut: _Cut) -> dict[str, dict[str, int]]:
    """Per phase ("F", "B") and name stem: how far the stem's numbers move from one
    layer's period to the next. Tracing names nodes it later drops too, so this is
    read from the periods rather than counted."""
    k = CAPTURED
    steps: dict[str, dict[str, int]] = {"F": {}, "B": {}}
    pairs = {"F": [(c, c + 1) for c in range(k - 2)], "B": [(c + 1, c) for c in range(1, k - 1)]}
    for kind, layer_pairs in pairs.items():
        for early, late in layer_pairs:
            for a, b in zip(cut.chunks[(kind, early)], cut.chunks[(kind, late)]):
                (stem, x), (stem_b, y) = _stem(a), _stem(b)
                if stem != stem_b or steps[kind].setdefault(stem, y - x) != y - x:
                    raise NotPeriodic(f"the names of {a.name} and {b.name} do not move by one layer's count")
    return steps


def _source(layer: int, depth: int) -> int:
    """The captured layer whose periods layer ``layer`` of ``depth`` copies."""
    k = CAPTURED
    if layer <= 1:
        return layer
    if layer >= depth - (k - 2):
        return layer - (depth - k)
    return 1


class _Builder:
    """Creates the ``depth``-layer graph node by node, in tracing order."""

    def __init__(self, gm: fx.GraphModule, cut: _Cut, stack_path: str, depth: int):
        self.gm, self.cut, self.path, self.depth = gm, cut, stack_path, depth
        self.graph = fx.Graph()
        self.once: dict[fx.Node, fx.Node] = {}
        self.copies: dict[tuple[str, int], list[fx.Node]] = {}
        self.producer: dict[Any, tuple[fx.Node, int]] = {}
        #: The new graph module's attributes (tensor constants renumbered like nodes).
        self.attrs: dict[str, Any] = {}
        self.steps = _steps(cut)
        for node in gm.graph.nodes:
            for j, t in enumerate(_tensors(node)):
                self.producer.setdefault(storage_key(t), (node, j))

    def find(self, y: fx.Node, shift: int | None) -> fx.Node:
        """The new node standing for captured node ``y``, seen from a node copied ``shift``
        layers on (None: from a node kept once after the layers)."""
        kind, c = self.cut.where[y]
        if c < 0:
            return self.once[y]
        if kind in ("EF", "EB"):
            layer = c + (self.depth - CAPTURED if kind == "EF" else 0)
            if shift is not None and c + shift != layer:
                raise NotPeriodic(f"node {y.name} is reached from a layer it does not belong to")
        else:
            layer = c + (self.depth - CAPTURED if shift is None else shift)
        nodes = self.copies.get((kind, layer))
        if nodes is None:
            raise NotPeriodic(f"node {y.name} ({kind} of layer {c}) has no counterpart at layer {layer}")
        return nodes[self.cut.pos[y]]

    def storage_keys(self, node: fx.Node, new: fx.Node, shift: int | None, unit: tuple) -> list:
        keys = []
        for j, t in enumerate(_tensors(node)):
            source, i = self.producer[storage_key(t)]
            if source is node:
                keys.append((unit, new.name, j))
            else:
                keys.append(self.find(source, shift).meta["storage_keys"][i])
        return keys

    def copy(self, node: fx.Node, shift: int | None, unit: tuple, name: str | None = None) -> fx.Node:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda y: self.find(y, shift))  # type: ignore[misc]
        target, name = node.target, name or self.name_of(node, shift)
        if node.op == "placeholder":
            target = name
        elif node.op == "get_attr":
            target = name if _is_constant(node) else node.target
            self.attrs[target] = getattr(self.gm, node.target)
        new = self.graph.create_node(node.op, target, args, kwargs, name=name)
        if new.name != name:
            raise NotPeriodic(f"node {node.name}'s copy cannot be named {name}")
        new.meta = dict(node.meta)
        if shift:
            self._shift_meta(new, shift)
        new.meta["storage_keys"] = self.storage_keys(node, new, shift, unit)
        return new

    def name_of(self, node: fx.Node, shift: int | None) -> str:
        """The name tracing gives ``node``'s copy ``shift`` layers on: its number
        moves by what each inserted period creates of its stem (see :func:`_steps`)."""
        stem, num = _stem(node)
        extra = self.depth - CAPTURED
        if node.meta.get("partitioner_tag") == _BACKWARD:
            shift = extra if shift is None else shift
            num += extra * self.steps["F"].get(stem, 0) + (extra - shift) * self.steps["B"].get(stem, 0)
        else:
            num += (shift or 0) * self.steps["F"].get(stem, 0)
        if _is_constant(node):
            return f"{stem}{num}"
        return f"{stem}_{num}" if num else stem

    def _shift_meta(self, new: fx.Node, shift: int) -> None:
        pattern = re.compile(rf"^({re.escape(self.path)}\.)(\d+)(\..*)?$")

        def moved(path: str) -> str:
            clean = clean_module_path(path)
            m = pattern.match(clean)
            return f"{m.group(1)}{int(m.group(2)) + shift}{m.group(3) or ''}" if m else path

        for key in ("nn_module_stack", "fwd_nn_module_stack"):
            stack = new.meta.get(key)
            if stack:
                new.meta[key] = {k: (moved(p), t) for k, (p, t) in stack.items()}
        if isinstance(new.meta.get("seq_nr"), int):
            new.meta["seq_nr"] += shift * _SEQ_STRIDE


def _tensors(node: fx.Node) -> list[torch.Tensor]:
    return [t for t in tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)]


def _build(gm: fx.GraphModule, cut: _Cut, stack_path: str, depth: int, num_fwd_outputs: int) -> tuple[fx.GraphModule, list]:
    """The ``depth``-layer joint graph, and per new primal where it comes from:
    ``(captured primal index, layer or None)``."""
    k = CAPTURED
    b = _Builder(gm, cut, stack_path, depth)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    origin: list = []
    primal_count = 0
    for i, node in enumerate(placeholders):
        kind, c = cut.where[node]
        if kind == "param" and (c > 0 or cut.pos[node] > 0):
            continue
        if kind == "param":  # the first layer's group starts: emit every layer's
            for layer in range(depth):
                src = cut.chunks[("param", _source(layer, depth))]
                b.copies[("param", layer)] = group = []
                for ph in src:
                    primal_count += 1
                    group.append(b.copy(ph, layer - _source(layer, depth), ("param", layer), f"primals_{primal_count}"))
                    origin.append((placeholders.index(ph), layer))
            continue
        primal = not node.name.startswith("tangents")
        primal_count += primal
        b.once[node] = b.copy(node, None, ("once",), f"primals_{primal_count}" if primal else node.name)
        if primal:
            origin.append((i, None))
    for node in cut.chunks.get(("P", -1), []):
        b.once[node] = b.copy(node, None, ("once",))
    _build_layers(b, "F", range(depth - 1), depth)
    _build_chunk(b, ("EF", depth - 1), cut.chunks[("EF", k - 1)], depth - k)
    for node in cut.chunks.get(("S", -1), []):
        b.once[node] = b.copy(node, None, ("once",))
    _build_layers(b, "B", range(depth - 1, 0, -1), depth)
    _build_chunk(b, ("EB", 0), cut.chunks[("EB", 0)], 0)
    _build_output(b, gm, placeholders, origin, num_fwd_outputs)
    new = fx.GraphModule(b.attrs, b.graph)
    new.meta.update(gm.meta)
    return new, origin


def _build_chunk(b: _Builder, key: tuple[str, int], nodes: list[fx.Node], shift: int) -> None:
    """Copies of ``nodes`` ``shift`` layers on, as chunk ``key`` (whose nodes may refer to one another)."""
    b.copies[key] = new = []
    for n in nodes:
        new.append(b.copy(n, shift, key))


def _build_layers(b: _Builder, kind: str, layers, depth: int) -> None:
    for layer in layers:
        src = _source(layer, depth)
        _build_chunk(b, (kind, layer), b.cut.chunks[(kind, src)], layer - src)


def _build_output(b: _Builder, gm: fx.GraphModule, placeholders: list, origin: list, num_fwd_outputs: int) -> None:
    out = gm.graph.find_nodes(op="output")[0]
    values = list(out.args[0])
    num_primals = sum(1 for p in placeholders if not p.name.startswith("tangents"))
    if len(values) != num_fwd_outputs + num_primals:
        raise NotPeriodic("the graph's outputs are not its forward outputs and one gradient per primal")
    fwd = []
    for v in values[:num_fwd_outputs]:
        if isinstance(v, fx.Node) and b.cut.where[v][0] in ("F", "B", "param"):
            raise NotPeriodic(f"the model returns {v.name}, a value of one layer")
        fwd.append(b.find(v, None) if isinstance(v, fx.Node) else v)
    grads = []
    for i, layer in origin:
        g = values[num_fwd_outputs + i]
        if not isinstance(g, fx.Node):
            grads.append(g)
        elif layer is None:
            grads.append(b.find(g, None))
        else:
            grads.append(b.find(g, layer - _source(layer, b.depth)))
    new_out = b.graph.output(tuple(fwd + grads) if isinstance(out.args[0], tuple) else fwd + grads)
    new_out.meta = dict(out.meta)


def repeat_layers(gm: fx.GraphModule, num_fwd_outputs: int, primal_names: list[str], stack_path: str,
                  depth: int) -> tuple[fx.GraphModule, list]:
    """The joint graph of the model with ``depth`` layers in its stack at ``stack_path``,
    from ``gm``, its joint graph captured with :data:`CAPTURED` layers, whose primals
    are named ``primal_names``. Returns it and, per new primal, ``(captured primal
    index, layer)`` (layer None: not a layer's). Raises :class:`NotPeriodic` when
    the captured layers are not copies of one another."""
    cut = _cut(gm, primal_names, stack_path)
    _check_periodic(gm, cut)
    again, _ = _build(gm, cut, stack_path, CAPTURED, num_fwd_outputs)
    if node_digests(again) != node_digests(gm) or graph_fingerprint(again, num_fwd_outputs) != graph_fingerprint(gm, num_fwd_outputs):
        raise NotPeriodic("rebuilding the captured graph does not give it back")
    return _build(gm, cut, stack_path, depth, num_fwd_outputs)


def record_repeated(model: torch.nn.Module, record: Callable[[], tuple[fx.GraphModule, int, list]],
                    primal_names: Callable[[list], list[str]]) -> tuple[fx.GraphModule, int, list, tuple] | None:
    """``record()`` (a capture returning ``(joint, num_fwd_outputs, primals)``) run with
    ``model``'s layer stack shortened to :data:`CAPTURED` layers, and its joint graph
    repeated to the stack's depth, with the primals of all layers. None when the model
    has no stack of :data:`MIN_DEPTH` layers, the shortened model does not capture, or
    its layers are not periodic: the caller captures the whole model then (and reports
    its errors). The fourth item is ``JointGraph.repeated``."""
    stack = find_layer_stack(model, MIN_DEPTH)
    if stack is None:
        return None
    try:
        with shortened(stack, CAPTURED):
            gm, num_fwd_outputs, primals = record()
    except CaptureError:
        return None
    names = primal_names(primals)
    try:
        full, origin = repeat_layers(gm, num_fwd_outputs, names, stack.path, stack.depth)
    except NotPeriodic:
        return None
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    layer_name = re.compile(rf"^{re.escape(stack.path)}\.\d+\.")
    values = [primals[i] if layer is None else tensors[layer_name.sub(f"{stack.path}.{layer}.", names[i])]
              for i, layer in origin]
    return full, num_fwd_outputs, values, (stack.path, CAPTURED, stack.depth)
