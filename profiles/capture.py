"""Capture a model's training step (forward and backward) as one torch.fx joint graph.

The capture runs the model once through ``torch.compile`` with an AOTAutograd
backend whose partition hook records the joint graph. Model state is left as it
was: buffers (BatchNorm statistics) and the RNG state are restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.fx as fx

from ._torch_private import (
    allow_recompiles,
    backend_error_cause,
    backward_without_autocast,
    copy_graph_module,
    no_aot_autograd_cache,
)
from .capture_errors import DataDependentShape, GraphBreak, explain_capture_failure
from .batch_norm_stats import drop_unread_running_stats
from .clone_elision import drop_same_layout_clones
from .dropout_pass import rewrite_dropout
from .executors import JointRecorded, check_executor, recording_backend
from .joint import CaptureError, JointGraph, mutated_primals
from .meta import capture_meta, uses_meta
from .norm_dtypes import record_layer_norm_stat_dtypes
from .regions import capture_regions, restitch
from .repeat_capture import record_repeated
from .signature import check_input_devices, graph_fingerprint, node_digests, structure_fingerprint

__all__ = ["capture", "normalize_inputs", "prepare_joint", "with_dropout", "state_kept"]


def normalize_inputs(model: torch.nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """Turn ``example_inputs`` into ``(args, kwargs)``.

    A tuple or list is positional, a dict (or Mapping) is keyword; a single tensor
    is one positional argument; ``None`` uses ``model.example_input_array``.
    """
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
        if example_inputs is None:
            raise ValueError(
                "no example inputs: pass example_inputs=(tensor, ...) or {name: tensor}, "
                "or set model.example_input_array (the PyTorch Lightning convention)"
            )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys"):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tuple of positional arguments, a dict of keyword "
        f"arguments or a tensor, not {type(example_inputs).__name__}"
    )


def prepare_joint(gm: fx.GraphModule, *, dropout: str = "mask", num_fwd_outputs: int | None = None) -> int:
    """Rewrites applied to every joint graph, at planning and at run time alike
    (after the fingerprint is taken, so it describes the model as captured).
    Returns the number of dropout ops rewritten.

    Buffers the step updates in place (BatchNorm statistics) are marked so that,
    when a recomputed BatchNorm needs them in backward, AOTAutograd hands them over
    without autograd's version check (training-mode BatchNorm does not read them), and
    training-mode BatchNorm backward is not handed the new statistics it does not read
    (:mod:`profiles.batch_norm_stats`), and copies eager does not make are read as the
    value they copy (:mod:`profiles.clone_elision`)."""
    if num_fwd_outputs is not None:
        mutated = mutated_primals(gm, num_fwd_outputs)
        for node in gm.graph.find_nodes(op="placeholder"):
            if node.name in mutated:
                node.meta["saved_tensor_with_no_vc_check"] = True
    record_layer_norm_stat_dtypes(gm)
    drop_unread_running_stats(gm)
    drop_same_layout_clones(gm)
    return rewrite_dropout(gm, dropout)


@contextlib.contextmanager
def _state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in training mode, then restore its mode, its
    buffers (BatchNorm statistics) and the CPU and CUDA RNG states, whatever happens."""
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])


#: ``_state_kept`` for other layers: a forward of the model that leaves no trace (the planner's look at its outputs).
state_kept = _state_kept


def _record_step(model: torch.nn.Module, args: tuple, kwargs: dict, executor: str = "eager",
                 options: dict | None = None) -> tuple[fx.GraphModule, int, list]:
    """Trace one training step of ``model`` through ``torch.compile``; return the joint
    graph handed to the partitioner (by AOTAutograd, or by Inductor for
    ``executor="inductor"``), its number of forward outputs and the tensors its
    primals stand for. The compile stops at the partitioner when those tensors are
    known there (:class:`~profiles.executors.JointRecorded`); else the forward runs."""
    recorded: dict[str, Any] = {}
    backend = recording_backend(recorded, executor, options, type(model).__name__)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with _state_kept(model):
        try:
            with torch.enable_grad(), backward_without_autocast(), no_aot_autograd_cache():
                compiled(*args, **kwargs)
        except Exception as e:  # torch.compile wraps every failure; say which step failed and why
            if isinstance(backend_error_cause(e), JointRecorded):
                return _recorded_step(recorded)
            if isinstance(backend_error_cause(e), DataDependentShape):
                raise backend_error_cause(e) from e
            err = explain_capture_failure(model, args, kwargs, e)
            raise err from (getattr(err, "error", None) or e)
    if "joint" not in recorded:
        raise CaptureError(
            f"{type(model).__name__} produced no backward graph: no output requires grad. "
            "Make sure some parameters have requires_grad=True and the outputs depend on them."
        )
    return _recorded_step(recorded)


def _recorded_step(recorded: dict) -> tuple[fx.GraphModule, int, list]:
    """``(joint, num_fwd_outputs, primals)`` from what the recording backend kept,
    which is then cleared: dynamo's cache keeps the backend, and with it this dict, alive."""
    joint, num_fwd_outputs, primals = recorded["joint"], recorded["num_fwd_outputs"], recorded.get("primals", [])
    recorded.clear()
    return joint, num_fwd_outputs, primals


def _primal_roles(model: torch.nn.Module, primals: list) -> tuple[list[str], list[str]]:
    """``(roles, names)``: per primal, "param", "buffer" or "input", and its fully
    qualified parameter/buffer name ("" for inputs)."""
    names_by_id: dict[int, tuple[str, str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), ("param", name))
    for name, b in model.named_buffers(remove_duplicate=False):
        names_by_id.setdefault(id(b), ("buffer", name))
    roles, names = [], []
    for v in primals:
        role, name = names_by_id.get(id(v), ("input", ""))
        roles.append(role)
        names.append(name)
    return roles, names


def capture(model: torch.nn.Module, example_inputs: Any = None, *, dropout: str = "mask", executor: str = "eager",
            compile_options: dict | None = None, repeat: bool = True) -> JointGraph:
    """Capture one training step of ``model`` on ``example_inputs`` as a joint graph.

    ``dropout`` picks how dropout outputs are made recomputable (see
    :mod:`profiles.dropout_pass`). ``executor="inductor"`` captures the joint graph
    Inductor partitions (after its decompositions and joint-graph passes, with
    Inductor options ``compile_options``), without generating code. A model or
    inputs on the meta device are captured on fake tensors, allocating nothing
    (see :mod:`profiles.meta`). A model that breaks the graph is captured as
    regions stitched into one joint graph (:mod:`profiles.regions`; op by op only).
    With ``repeat``, a deep stack of identical layers is traced with four of them
    and its joint graph repeated to the stack's depth (:mod:`profiles.repeat_capture`;
    op by op only): the same graph, traced in a fraction of the time. The environment
    variable ``PLANNER_REPEAT_LAYERS=0`` turns this off (every layer is traced)."""
    check_executor(executor)
    args, kwargs = normalize_inputs(model, example_inputs)
    if uses_meta(model, args, kwargs):
        return capture_meta(model, args, kwargs, capture, dropout=dropout, executor=executor,
                            compile_options=compile_options, repeat=repeat)
    check_input_devices(model, args, kwargs, allow_meta=True)
    allow_recompiles()

    def record():
        return _record_step(model, args, kwargs, executor, compile_options)

    repeated = None
    if repeat and executor == "eager" and os.environ.get("PLANNER_REPEAT_LAYERS", "1") != "0":
        repeated = record_repeated(model, record, lambda primals: _primal_roles(model, primals)[1])
    try:
        gm, num_fwd_outputs, primals, how = repeated or (*record(), ())
    except GraphBreak as e:
        if executor != "eager":
            raise
        gm, first_break = None, f"{e.file}:{e.line} ({e.reason})"
    if gm is None:
        return capture_regions(model, args, kwargs, dropout=dropout, prepare=prepare_joint, state_kept=_state_kept,
                               first_break=first_break)
    roles, names = _primal_roles(model, primals)
    fingerprint = graph_fingerprint(gm, num_fwd_outputs)  # of the graph as captured, before prepare_joint
    structure = structure_fingerprint(gm, num_fwd_outputs)
    digests = node_digests(gm)
    raw_gm = copy_graph_module(gm)
    num_dropouts = prepare_joint(gm, dropout=dropout, num_fwd_outputs=num_fwd_outputs)
    return JointGraph(
        gm=gm,
        num_fwd_outputs=num_fwd_outputs,
        primal_roles=roles,
        primal_names=names,
        primal_values=primals,
        fingerprint=fingerprint,
        structure=structure,
        node_digests=digests,
        dropout=dropout,
        num_dropouts=num_dropouts,
        raw_gm=raw_gm,
        executor=executor,
        repeated=how,
    )


def with_dropout(joint: JointGraph, dropout: str) -> JointGraph:
    """``joint`` with dropout rewritten as ``dropout`` (see :mod:`profiles.dropout_pass`),
    from the graph as captured: the same as capturing again, without running the model."""
    if joint.raw_gm is None:
        raise ValueError("this JointGraph keeps no copy of the captured graph; capture the model again")
    if joint.regions:
        return restitch(joint, dropout, prepare_joint)
    gm = copy_graph_module(joint.raw_gm)
    return JointGraph(
        gm=gm,
        num_fwd_outputs=joint.num_fwd_outputs,
        primal_roles=list(joint.primal_roles),
        primal_names=list(joint.primal_names),
        primal_values=list(joint.primal_values),
        fingerprint=joint.fingerprint,
        structure=joint.structure,
        node_digests=list(joint.node_digests),
        dropout=dropout,
        num_dropouts=prepare_joint(gm, dropout=dropout, num_fwd_outputs=joint.num_fwd_outputs),
        raw_gm=joint.raw_gm,
        fake=joint.fake,
        executor=joint.executor,
        repeated=joint.repeated,
    )
