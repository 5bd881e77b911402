"""The joint graph of a deep stack of identical layers, made from a capture of four.

Tracing a step through dynamo and AOTAutograd costs time in proportion to its
operators, and a deep model is mostly copies of one layer. So a model with a
:mod:`layer stack <profiles.layer_stack>` of ``L`` layers is captured with its
first :data:`CAPTURED` layers only, and the joint graph of all ``L`` is built
from that one: the same nodes, names, arguments and metadata that tracing the
whole model gives (``tests/test_repeat_capture.py`` compares the two).

The captured graph is cut into per-layer periods (:mod:`profiles.layer_periods`),
which must repeat. The ``L``-layer graph is then the captured one with layer 1's
periods copied for the layers in between, each copy's references moved by as many
layers. Every node gets the name tracing gives it: its number moves by what each
inserted period creates of its name's stem (tracing also numbers nodes it later
drops, so the steps are read from the periods). Rebuilding the captured graph
itself this way must give it back exactly, which is checked on every capture.

Whatever does not fit (layers that differ, a model returning each layer's
output) raises :class:`NotPeriodic`, and the caller captures the whole model.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.fx as fx

from ._torch_private import aot_descriptor, mutation_descriptor, storage_key
from .joint import CaptureError
from .layer_periods import (
    BACKWARD,
    CAPTURED,
    NotPeriodic,
    Periods,
    check_periodic,
    cut_periods,
    is_constant,
    name_steps,
    name_stem,
)
from .layer_stack import find_layer_stack, shortened
from .nodes import clean_module_path, value_tensors
from .signature import graph_fingerprint, node_digests

__all__ = ["CAPTURED", "MIN_DEPTH", "NotPeriodic", "repeat_layers", "record_repeated"]

#: Stacks at least this deep are captured with :data:`CAPTURED` layers and repeated.
MIN_DEPTH = 8
#: Offset between the autograd sequence numbers of two copies of a layer.
_SEQ_STRIDE = 1 << 20


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

    def __init__(self, gm: fx.GraphModule, cut: Periods, stack_path: str, depth: int):
        self.gm, self.cut, self.depth = gm, cut, depth
        self.graph = fx.Graph()
        self.once: dict[fx.Node, fx.Node] = {}
        self.copies: dict[tuple[str, int], list[fx.Node]] = {}
        self.producer: dict[Any, tuple[fx.Node, int]] = {}
        #: The new graph module's attributes (tensor constants renumbered like nodes).
        self.attrs: dict[str, Any] = {}
        self.steps = name_steps(cut)
        #: A module path inside the stack: ``<stack>.<layer>`` and the rest.
        self.layer_path = re.compile(rf"^({re.escape(stack_path)}\.)(\d+)(\..*)?$")
        for node in gm.graph.nodes:
            for j, t in enumerate(value_tensors(node)):
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
        for j, t in enumerate(value_tensors(node)):
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
            target = name if is_constant(node) else node.target
            self.attrs[target] = getattr(self.gm, node.target)
        new = self.graph.create_node(node.op, target, args, kwargs, name=name)
        if new.name != name:
            raise NotPeriodic(f"node {node.name}'s copy cannot be named {name}")
        new.meta = dict(node.meta)
        if node.op == "placeholder":
            new.meta.pop("desc", None)  # AOTAutograd's input index: the new graph numbers its primals anew
        if shift:
            self._shift_meta(new, shift)
        new.meta["storage_keys"] = self.storage_keys(node, new, shift, unit)
        return new

    def name_of(self, node: fx.Node, shift: int | None) -> str:
        """The name tracing gives ``node``'s copy ``shift`` layers on: its number
        moves by what each inserted period creates of its stem (:func:`~profiles.layer_periods.name_steps`)."""
        stem, num = name_stem(node)
        extra = self.depth - CAPTURED
        if node.meta.get("partitioner_tag") == BACKWARD:
            shift = extra if shift is None else shift
            num += extra * self.steps["F"].get(stem, 0) + (extra - shift) * self.steps["B"].get(stem, 0)
        else:
            num += (shift or 0) * self.steps["F"].get(stem, 0)
        if is_constant(node):
            return f"{stem}{num}"
        return f"{stem}_{num}" if num else stem

    def _shift_meta(self, new: fx.Node, shift: int) -> None:
        def moved(path: str) -> str:
            m = self.layer_path.match(clean_module_path(path))
            return f"{m.group(1)}{int(m.group(2)) + shift}{m.group(3) or ''}" if m else path

        for key in ("nn_module_stack", "fwd_nn_module_stack"):
            stack = new.meta.get(key)
            if stack:
                new.meta[key] = {k: (moved(p), t) for k, (p, t) in stack.items()}
        if isinstance(new.meta.get("seq_nr"), int):
            new.meta["seq_nr"] += shift * _SEQ_STRIDE


def _build(gm: fx.GraphModule, cut: Periods, stack_path: str, depth: int, num_fwd_outputs: int) -> tuple[fx.GraphModule, list]:
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
    new_out.meta["desc"] = _output_descriptors(out, origin, num_fwd_outputs)


def _output_descriptors(out: fx.Node, origin: list, num_fwd_outputs: int) -> list:
    """AOTAutograd's descriptors of the new graph's outputs: the forward outputs', with
    a mutated input's index moved to where that primal now is (``joint.mutated_primals``
    reads them); None for the gradients."""
    new_index = {i: j for j, (i, layer) in enumerate(origin) if layer is None}
    descs = []
    for desc in list(out.meta.get("desc") or [None] * num_fwd_outputs)[:num_fwd_outputs]:
        kind = aot_descriptor(desc)
        if kind is not None and kind[0] == "mutation":
            if kind[1] not in new_index:
                raise NotPeriodic("the step updates a layer's buffer in place")
            desc = mutation_descriptor(new_index[kind[1]])
        descs.append(desc)
    return descs + [None] * len(origin)


def repeat_layers(gm: fx.GraphModule, num_fwd_outputs: int, primal_names: list[str], stack_path: str,
                  depth: int) -> tuple[fx.GraphModule, list]:
    """The joint graph of the model with ``depth`` layers in its stack at ``stack_path``,
    from ``gm``, its joint graph captured with :data:`CAPTURED` layers, whose primals
    are named ``primal_names``. Returns it and, per new primal, ``(captured primal
    index, layer)`` (layer None: not a layer's). Raises :class:`NotPeriodic` when
    the captured layers are not copies of one another."""
    cut = cut_periods(gm, primal_names, stack_path)
    check_periodic(gm, cut)
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
