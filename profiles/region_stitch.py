"""Join the joint graphs of a step's regions into one joint graph of the whole step.

A model that breaks the graph runs as regions: compiled pieces of forward, each
with its own backward (:mod:`profiles.regions` records them). Autograd runs the
regions' forwards in order and their backwards in reverse, a region's gradient
inputs (tangents) being the gradients later regions computed for the tensors it
handed them. :func:`stitch` builds exactly that as one joint graph, so the
planner's simulator and solvers see the whole step:

- placeholders ``primals_*`` for the step's parameters, buffers and inputs (one
  per tensor, however many regions read it), then ``tangents_*`` for region
  outputs whose gradient no later region computes (the loss, and outputs only
  Python code reads);
- each region's forward nodes in region order, then each region's backward nodes
  in reverse region order, named ``r<k>_<name>`` (``k`` from 1);
- a region input that is an earlier region's output is that output's node, which
  is marked ``meta["region_boundary"]``: it cannot be recomputed in another
  region's backward (:func:`profiles.nodes.is_recomputable`);
- gradients of one tensor from several regions are summed (``aten.add``), as
  autograd accumulates them;
- each node's ``meta["storage_keys"]`` names the storage of each tensor it makes
  (what :func:`profiles.graph_profile.profile_graph` counts): a region's inputs are
  the storages they come from, and a compiled graph called several times (whose
  fake values the copies share) gets storages of its own in each copy;
- the new values of buffers a region updates in place (BatchNorm statistics) come
  first among the forward outputs, described as AOTAutograd describes them;
- a region output the model returns, or that no later region reads, is a forward
  output of the whole step (the caller holds it until backward ends); one that
  later regions read is freed after its last use, as it is at run time (measured:
  the frames dynamo resumes the forward in do not keep it).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ._torch_private import aot_descriptor, mutation_descriptor, storage_key
from .joint import CaptureError, CapturedRegion
from .nodes import value_tensors

__all__ = ["stitch", "region_prefix"]

_BACKWARD = "is_backward"


def region_prefix(k: int) -> str:
    """The prefix of region ``k``'s node names in the stitched graph (``k`` from 0)."""
    return f"r{k + 1}_"


class _Parts:
    """One region's joint graph taken apart by AOTAutograd's descriptors."""

    def __init__(self, gm: fx.GraphModule, num_fwd_outputs: int, where: str):
        self.gm = gm
        self.inputs: dict[fx.Node, int] = {}
        self.tangents: dict[fx.Node, int] = {}
        for node in gm.graph.find_nodes(op="placeholder"):
            kind = aot_descriptor(node.meta.get("desc"))
            if kind is not None and kind[0] == "input":
                self.inputs[node] = kind[1]
            elif kind is not None and kind[0] == "tangent":
                self.tangents[node] = kind[1]
            else:
                raise CaptureError(
                    f"the region at {where} has an input the planner cannot place ({node.name}: "
                    f"{node.meta.get('desc')}); regions may not mutate their inputs in place or take tensor subclasses"
                )
        out = gm.graph.output_node()
        values = list(out.args[0])
        descs = list(out.meta.get("desc") or [None] * len(values))
        self.outputs: list[fx.Node] = []
        #: (new value, input index) of each input the region updates in place (BatchNorm statistics).
        self.mutations: list[tuple[fx.Node, int]] = []
        self.grads: dict[int, fx.Node] = {}
        for i, (value, desc) in enumerate(zip(values, descs)):
            kind = aot_descriptor(desc)
            if i < num_fwd_outputs and kind is not None and kind[0] == "mutation" and isinstance(value, fx.Node):
                self.mutations.append((value, kind[1]))
            elif i < num_fwd_outputs:
                if kind is None or kind[0] != "output" or kind[1] != len(self.outputs) or not isinstance(value, fx.Node):
                    raise CaptureError(
                        f"the region at {where} returns a value the planner cannot place ({desc}); regions may not "
                        "return non-tensors or update their inputs' metadata"
                    )
                self.outputs.append(value)
            elif value is not None and kind is not None and kind[0] == "grad":
                self.grads[kind[1]] = value


def _copy(graph: fx.Graph, root: torch.nn.Module, node: fx.Node, env: dict, prefix: str) -> fx.Node:
    args = fx.map_arg(node.args, env.__getitem__)
    kwargs = fx.map_arg(node.kwargs, env.__getitem__)
    target = node.target
    if node.op == "get_attr":
        target = prefix + str(node.target).replace(".", "_")
        setattr(root, target, getattr(node.graph.owning_module, str(node.target)))
    new = graph.create_node(node.op, target, args, kwargs, name=prefix + node.name)
    new.meta = dict(node.meta)
    return new


def _sum(graph: fx.Graph, values: list[fx.Node], name: str) -> fx.Node:
    """``values`` added up in a backward node named ``name`` (the first value alone when it is the only one)."""
    total = values[0]
    for v in values[1:]:
        total = graph.create_node("call_function", torch.ops.aten.add.Tensor, (total, v), name=name)
        total.meta = {k: v for k, v in values[0].meta.items() if k in ("val", "tensor_meta")}
        total.meta["partitioner_tag"] = _BACKWARD
        total.meta["storage_keys"] = [("sum", total.name)]
    return total


def _keys(node: fx.Node, alias: dict, k: int) -> list:
    """The storage of each tensor ``node`` (of region ``k``) makes: an input's, or one of the region's own."""
    return [alias.get(storage_key(t), ("r", k, storage_key(t))) for t in value_tensors(node)]


def _alias(alias: dict, node: fx.Node, source: fx.Node) -> None:
    """Region input ``node`` is ``source``: its storage (and its views') is ``source``'s."""
    for t in value_tensors(node):
        alias[storage_key(t)] = source.meta["storage_keys"][0]


def _mutations(parts: list, regions: list[CapturedRegion], envs: list[dict]) -> list[tuple[fx.Node, int]]:
    """``(new value, primal index)`` of every in-place update the regions make, in order."""
    mutations = []
    for k, (p, r) in enumerate(zip(parts, regions)):
        for value, i in p.mutations:
            kind, a, _ = r.sources[i]
            if kind != "primal":
                raise CaptureError(f"the region at {r.where} updates in place a tensor an earlier region made; "
                                   "the planner plans in-place updates of parameters, buffers and inputs only")
            mutations.append((envs[k][value], a))
    return mutations


def stitch(graphs: list[fx.GraphModule], regions: list[CapturedRegion], num_primals: int, *,
           primal_storage: list[int] | None = None) -> tuple[fx.GraphModule, int]:
    """The whole step's joint graph and its number of forward outputs, from each
    region's joint graph (``graphs[k]``, as captured or after ``prepare_joint``) and
    where each region's inputs come from (``regions[k].sources``). ``primal_storage[i]``:
    the first primal whose storage primal ``i`` shares (a view of an input that eager
    code passes to a region); each its own when not given."""
    parts = [_Parts(gm, r.num_fwd_outputs, r.where) for gm, r in zip(graphs, regions)]
    graph, root = fx.Graph(), torch.nn.Module()
    first_use: dict[int, fx.Node] = {}
    consumers: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for k, (p, r) in enumerate(zip(parts, regions)):
        for node, i in p.inputs.items():
            kind, a, b = r.sources[i]
            if kind == "primal":
                first_use.setdefault(a, node)
            else:
                consumers.setdefault((a, b), []).append((k, i))
    primals = []
    for idx in range(num_primals):
        ph = graph.placeholder(f"primals_{idx + 1}")
        ph.meta = {k: v for k, v in first_use[idx].meta.items() if k in ("val", "tensor_meta")}
        ph.meta["storage_keys"] = [("primal", primal_storage[idx] if primal_storage else idx)]
        primals.append(ph)
    tangents: dict[tuple[int, int], fx.Node] = {}
    for j, p in enumerate(parts):
        for node, o in p.tangents.items():
            if not any(i in parts[k].grads for k, i in consumers.get((j, o), [])):
                ph = graph.placeholder(f"tangents_{len(tangents) + 1}")
                ph.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
                ph.meta["storage_keys"] = [("tangent", j, o)]
                tangents[(j, o)] = ph
    envs: list[dict] = [{} for _ in parts]
    aliases: list[dict] = [{} for _ in parts]
    for k, (p, r) in enumerate(zip(parts, regions)):
        env, prefix = envs[k], region_prefix(k)
        for node in p.gm.graph.nodes:
            if node in p.inputs:
                kind, a, b = r.sources[p.inputs[node]]
                env[node] = primals[a] if kind == "primal" else envs[a][parts[a].outputs[b]]
                _alias(aliases[k], node, env[node])
            elif node.op in ("call_function", "get_attr") and node.meta.get("partitioner_tag") != _BACKWARD:
                env[node] = _copy(graph, root, node, env, prefix)
                env[node].meta["storage_keys"] = _keys(node, aliases[k], k)
        for out in p.outputs:
            if out.op != "placeholder":
                envs[k][out].meta["region_boundary"] = True
    grads: dict[int, list[fx.Node]] = {}
    for k in reversed(range(len(parts))):
        p, r, env, prefix = parts[k], regions[k], envs[k], region_prefix(k)
        for node, o in p.tangents.items():
            given = [envs[c][parts[c].grads[i]] for c, i in consumers.get((k, o), []) if i in parts[c].grads]
            env[node] = _sum(graph, given, f"{prefix}grad_sum") if given else tangents[(k, o)]
            _alias(aliases[k], node, env[node])
        for node in p.gm.graph.nodes:
            if node.op in ("call_function", "get_attr") and node.meta.get("partitioner_tag") == _BACKWARD:
                env[node] = _copy(graph, root, node, env, prefix)
                env[node].meta["storage_keys"] = _keys(node, aliases[k], k)
        for i, g in p.grads.items():
            kind, a, _ = r.sources[i]
            if kind == "primal":
                grads.setdefault(a, []).append(env[g])
                if len(grads[a]) > 1:
                    grads[a] = [_sum(graph, grads[a], f"{prefix}grad_accumulate")]
    mutations = _mutations(parts, regions, envs)
    kept = [(k, o) for k, (p, r) in enumerate(zip(parts, regions)) for o in range(len(p.outputs))
            if (k, o) not in consumers or o in r.returned]
    out = graph.output((*[v for v, _ in mutations], *[envs[k][parts[k].outputs[o]] for k, o in kept],
                        *[grads[i][0] if i in grads else None for i in range(num_primals)]))
    out.meta["desc"] = [mutation_descriptor(a) for _, a in mutations] + [None] * (len(kept) + num_primals)
    out.meta["loss_read"] = tuple(len(mutations) + i for i, (k, o) in enumerate(kept) if o in regions[k].loss_read)
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm, len(mutations) + len(kept)
