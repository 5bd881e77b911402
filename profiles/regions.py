"""Capture a step that breaks the graph as regions, stitched into one joint graph.

``torch.compile`` without ``fullgraph`` compiles a model that breaks the graph
(a ``print``, a branch on ``.item()``) as regions: each a piece of forward with
its own backward, compiled when the forward first reaches it, with Python code
running in between. :func:`capture_regions` runs the model's forward once that
way, records each region's joint graph and, by tensor identity, where each of its
inputs comes from (a parameter, a model input, or an earlier region's output), and
stitches the regions into one joint graph of the step (:mod:`profiles.region_stitch`).
Nothing runs backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from ._torch_private import (
    aot_autograd,
    backend_error_cause,
    backward_without_autocast,
    copy_graph_module,
    default_partition,
    make_boxed,
    no_aot_autograd_cache,
    quiet_graph_breaks,
    reads_fake_value,
    storage_key,
    tree_leaves,
)
from .capture_errors import DataDependentShape, check_static_shapes, trace_frames
from .causal_sdpa import with_causal_sdpa
from .eager_loss import EagerLoss, loss_inputs, measure_eager_loss
from .joint import CaptureError, CapturedRegion, JointGraph
from .region_stitch import stitch
from .signature import graph_fingerprint, node_digests, structure_fingerprint

__all__ = ["capture_regions", "restitch", "where_traced"]


class _Recorder:
    """A ``torch.compile`` backend that keeps each region's joint graph and every
    call of each compiled region (its inputs and outputs)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.regions: list[dict] = []
        self.calls: list[tuple[int, list, list]] = []
        #: Called after each call of a compiled region returns (the eager loss's measurement marks).
        self.on_call: Callable[[], None] | None = None

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Callable:
        check_static_shapes(gm, self.model_name)
        k = len(self.regions)
        rec: dict[str, Any] = {"where": where_traced(gm)}
        self.regions.append(rec)

        def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
            rec["joint"], rec["num_fwd_outputs"] = copy_graph_module(joint), num_fwd_outputs
            return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)

        compiled = aot_autograd(fw_compiler=lambda g, ex: make_boxed(g), bw_compiler=lambda g, ex: make_boxed(g),
                                partition_fn=partition)(gm, example_inputs)

        def run(*args):
            boxed = len(args) == 1 and isinstance(args[0], list)  # dynamo's boxed calling convention
            inputs = list(args[0]) if boxed else list(args)
            out = compiled(*args)
            self.calls.append((k, inputs, list(out)))
            if self.on_call is not None:
                self.on_call()
            return out

        if getattr(compiled, "_boxed_call", False):
            run._boxed_call = True
        return run


def where_traced(gm: fx.GraphModule) -> str:
    """``file:first-last`` lines of the outermost user code a dynamo graph was traced from."""
    lines = []
    for node in gm.graph.nodes:
        frames = trace_frames(node.meta.get("stack_trace") or "")
        if frames:
            lines.append(frames[0][:2])
    if not lines:
        return "an unknown place"
    file = lines[0][0]
    nums = [n for f, n in lines if f == file]
    return f"{file}:{min(nums)}-{max(nums)}"


def _sources(model: torch.nn.Module, args: tuple, kwargs: dict, calls: list, regions: list) -> tuple[list, list, list, list]:
    """Per region, where each input comes from, and the step's primals: their
    tensors, roles ("param", "buffer", "input") and names."""
    named: dict[int, tuple[str, str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        named.setdefault(id(p), ("param", name))
    for name, b in model.named_buffers(remove_duplicate=False):
        named.setdefault(id(b), ("buffer", name))
    user_inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    values, roles, names, index = [], [], [], {}
    produced: dict[int, tuple[int, int]] = {}
    sources = []
    for k, (region, inputs, outputs) in enumerate(calls):
        src = []
        for i, t in enumerate(inputs):
            if id(t) in produced and id(t) not in named:
                j, o = produced[id(t)]
                src.append(("output", j, o))
                continue
            if isinstance(t, torch.Tensor) and t.grad_fn is not None and id(t) not in named and id(t) not in user_inputs:
                where = regions[region]["where"]
                raise CaptureError(
                    f"the graph region at {where} takes a tensor that requires grad and was computed outside any "
                    "compiled region: torch.compile runs eagerly the code around a graph break it cannot resume "
                    "after (one inside a loop, or in a function it skips), and the planner cannot see that code's "
                    "backward. Move the graph break (print, .item(), data-dependent if) out of the loop, into the "
                    "forward of the module that runs the loop, or remove it"
                )
            if id(t) not in index:
                index[id(t)] = len(values)
                values.append(t)
                role, name = named.get(id(t), ("input", ""))
                roles.append(role)
                names.append(name)
            src.append(("primal", index[id(t)], 0))
        for o, t in enumerate(outputs):
            if isinstance(t, torch.Tensor):
                produced[id(t)] = (k, o)
        sources.append(tuple(src))
    return sources, values, roles, names


def _eager_losses(model: torch.nn.Module, outputs: Any, calls: list, regions: list) -> list[torch.Tensor]:
    """The outputs of the model that have a backward and were computed outside the
    compiled regions (eagerly, after a graph break torch.compile could not resume
    after). One one-element output (a loss) is measured (:mod:`profiles.eager_loss`);
    ``CaptureError`` for any other."""
    produced = {id(t) for _, _, outs in calls for t in outs}
    outside = [t for t in tree_leaves(outputs)
               if isinstance(t, torch.Tensor) and t.grad_fn is not None and id(t) not in produced]
    refused = [t for t in outside if t.numel() != 1] or outside[1:]
    if refused:
        t, last = refused[0], regions[calls[-1][0]]["where"]
        raise CaptureError(
            f"{type(model).__name__} returns a tensor {tuple(t.shape)} computed outside its compiled graph regions "
            f"(after the region at {last}): torch.compile runs eagerly the code after a graph break it cannot "
            "resume after (one inside a loop or a `with` block it does not support, or in a function it skips), "
            "and the planner cannot see that code's memory (it measures one eagerly computed loss, nothing else). "
            "Move the graph break out of that code, or compute the loss outside the model "
            "(planner.plan(..., loss_fn=...))"
        )
    return outside


def _measure_loss(model: torch.nn.Module, compiled: Callable, args: tuple, kwargs: dict, recorder: _Recorder,
                  where: str) -> EagerLoss:
    """The eager loss's memory, measured on one more forward of ``compiled`` (regions
    compiled already) and its backward down to the region outputs it reads."""
    name = type(model).__name__
    first = len(recorder.calls)

    def forward(mark):
        recorder.on_call = mark
        try:
            return compiled(*args, **kwargs)
        finally:
            recorder.on_call = None

    def find(outputs):
        calls = recorder.calls[first:]
        (loss,) = _eager_losses(model, outputs, calls, recorder.regions)
        return loss, loss_inputs(loss, [t for _, _, outs in calls for t in outs], name)

    device = next((t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    try:
        return measure_eager_loss(forward, find, device=device, where=where)
    finally:
        del recorder.calls[first:]


def capture_regions(model: torch.nn.Module, args: tuple, kwargs: dict, *, dropout: str, prepare: Callable,
                    state_kept: Callable, first_break: str = "") -> JointGraph:
    """The step of ``model`` on ``(args, kwargs)``, which breaks the graph, as regions
    stitched into one joint graph (:class:`~profiles.joint.JointGraph` with ``regions``).
    ``prepare`` is ``capture.prepare_joint``; ``state_kept`` restores the model's
    state (buffers, RNG, mode) after the forward. ``first_break`` (where torch.compile
    first breaks the graph) is added to the errors raised."""
    try:
        return _capture_regions(model, args, kwargs, dropout=dropout, prepare=prepare, state_kept=state_kept)
    except CaptureError as e:
        if not first_break:
            raise
        raise CaptureError(f"{e} (torch.compile first breaks the graph at {first_break})") from e


def _capture_regions(model: torch.nn.Module, args: tuple, kwargs: dict, *, dropout: str, prepare: Callable,
                     state_kept: Callable) -> JointGraph:
    recorder = _Recorder(type(model).__name__)
    compiled = torch.compile(model, backend=with_causal_sdpa(recorder), fullgraph=False, dynamic=False)
    with state_kept(model), torch.enable_grad(), backward_without_autocast(), no_aot_autograd_cache(), quiet_graph_breaks():
        outputs = _run(model, compiled, args, kwargs)
        # a region without a backward (nothing in it requires grad) is left out: its outputs are inputs of the step
        calls = [c for c in recorder.calls if "joint" in recorder.regions[c[0]]]
        if not calls:
            raise CaptureError(
                f"{type(model).__name__} produced no backward graph: no output requires grad. "
                "Make sure some parameters have requires_grad=True and the outputs depend on them."
            )
        sources, values, roles, names = _sources(model, args, kwargs, calls, recorder.regions)
        eager_loss, read = None, set()
        losses = _eager_losses(model, outputs, calls, recorder.regions)
        if losses:  # refused before measuring when it reads more than region outputs
            read = {id(t) for t in loss_inputs(losses[0], [t for _, _, outs in calls for t in outs], type(model).__name__)}
            del losses
            eager_loss = _measure_loss(model, compiled, args, kwargs, recorder, recorder.regions[calls[-1][0]]["where"])
    raw = []
    model_outputs = {id(t) for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)}
    for (k, _, outs), src in zip(calls, sources):
        rec = recorder.regions[k]
        gm, nfo = rec["joint"], rec["num_fwd_outputs"]
        returned = tuple(o for o, t in enumerate(outs) if id(t) in model_outputs)
        loss_read = tuple(o for o, t in enumerate(outs) if id(t) in read and id(t) not in model_outputs)
        raw.append(CapturedRegion(raw_gm=gm, num_fwd_outputs=nfo, sources=src, graph=k, returned=returned,
                                  loss_read=loss_read,
                                  fingerprint=graph_fingerprint(gm, nfo), structure=structure_fingerprint(gm, nfo),
                                  where=rec["where"]))
    return _joint(raw, dropout, prepare, eager_loss, primal_values=values, primal_roles=roles, primal_names=names)


def _run(model: torch.nn.Module, compiled: Callable, args: tuple, kwargs: dict) -> Any:
    """``compiled(*args, **kwargs)``, its capture errors told as the planner's."""
    try:
        return compiled(*args, **kwargs)
    except Exception as e:  # torch.compile wraps what the backend raises
        if isinstance(backend_error_cause(e), DataDependentShape):
            raise backend_error_cause(e) from e
        if reads_fake_value(e):
            raise CaptureError(
                f"{type(model).__name__} on the meta device reads a tensor's value between its graph regions "
                "(`.item()`, a branch on a tensor), which a meta tensor does not have: build the model on a real "
                "device (the CPU will do, with smaller sizes) to plan it, or make the branch traceable "
                "(torch.where, torch.cond)"
            ) from e
        raise


def _joint(regions: list[CapturedRegion], dropout: str, prepare: Callable, eager_loss: EagerLoss | None,
           **primals) -> JointGraph:
    shared = _shared_storages(primals["primal_values"])
    raw_gm, nfo = stitch([r.raw_gm for r in regions], regions, len(shared), primal_storage=shared)
    graphs, dropouts = [], 0
    for r in regions:
        gm = copy_graph_module(r.raw_gm)
        dropouts += prepare(gm, dropout=dropout, num_fwd_outputs=r.num_fwd_outputs)
        graphs.append(gm)
    gm, _ = stitch(graphs, regions, len(shared), primal_storage=shared)
    return JointGraph(gm=gm, num_fwd_outputs=nfo, fingerprint=graph_fingerprint(raw_gm, nfo),
                      loss_read_outputs=gm.graph.find_nodes(op="output")[0].meta.get("loss_read", ()),
                      structure=structure_fingerprint(raw_gm, nfo), node_digests=node_digests(raw_gm), dropout=dropout,
                      num_dropouts=dropouts, raw_gm=raw_gm, regions=tuple(regions), eager_loss=eager_loss, **primals)


def _shared_storages(values: list) -> list[int]:
    """Per primal, the first primal on the same storage (itself when none): eager code
    between regions may pass a region a view of an input (``input_values[:, None]``)."""
    first: dict = {}
    return [first.setdefault(storage_key(t), i) for i, t in enumerate(values)]


def restitch(joint: JointGraph, dropout: str, prepare: Callable) -> JointGraph:
    """``joint`` (captured as regions) with dropout rewritten as ``dropout`` in every region."""
    return _joint(list(joint.regions), dropout, prepare, joint.eager_loss, primal_values=list(joint.primal_values),
                  primal_roles=list(joint.primal_roles), primal_names=list(joint.primal_names))
