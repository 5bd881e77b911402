"""What runs a plan's graphs, and the capture backend for each: op by op or Inductor.

``"eager"`` runs the split forward and backward graphs op by op (one kernel per
aten op); the joint graph is AOTAutograd's. ``"inductor"`` compiles them with
Inductor, which partitions its own joint graph: the one after its decompositions
and joint-graph passes (other node names and ops), so a plan for Inductor is made
on that graph. A ``torch.compile``-d module is unwrapped to the module it wraps
and the Inductor options it was compiled with.
"""

from __future__ import annotations

from typing import Callable

import torch

from .capture_errors import check_static_shapes
from .causal_sdpa import with_causal_sdpa
from ._torch_private import (
    CustomPartitionerFn,
    aot_autograd,
    default_partition,
    inductor_capture_backend,
    inductor_options_of,
    is_compiled_module,
)

__all__ = ["EXECUTORS", "check_executor", "unwrap_compiled", "recording_backend", "JointRecorded"]

#: What can run a plan's graphs: ``"eager"`` (op by op) or ``"inductor"`` (compiled by Inductor).
EXECUTORS = ("eager", "inductor")


def check_executor(executor: str) -> str:
    """``executor`` when it is one of :data:`EXECUTORS`, else ``ValueError``."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}: choose one of {', '.join(map(repr, EXECUTORS))}")
    return executor


def unwrap_compiled(model: torch.nn.Module) -> tuple[torch.nn.Module, dict | None]:
    """``(module, options)``: for a ``torch.compile``-d module, the module it wraps and
    the Inductor options it was compiled with (``{}`` for the defaults); for any
    other module, itself and ``None``. ``ValueError`` when it was compiled with a
    backend other than Inductor: the planner compiles the model with its own."""
    if not is_compiled_module(model):
        return model, None
    options = inductor_options_of(model)
    if options is None:
        raise ValueError(
            f"{type(model._orig_mod).__name__} is compiled with a backend other than Inductor; the planner compiles "
            "the model itself (op by op, or with Inductor): pass the module before torch.compile (compiled._orig_mod)"
        )
    return model._orig_mod, options


class JointRecorded(Exception):
    """Raised by the recording partitioner once it holds the joint graph and the
    tensors its primals stand for: the capture needs nothing more, so the compile
    stops there, without splitting the graph or running the forward."""


def _primals_of(joint, backend_inputs: list | None) -> list | None:
    """The tensors ``joint``'s primals stand for: the backend's example inputs when
    they match the primal placeholders one to one (count, shape, stride, dtype),
    else ``None`` (AOTAutograd deduplicated or merged inputs: the forward must run
    to tell which tensor is which primal)."""
    if backend_inputs is None:
        return None
    primals = [n for n in joint.graph.find_nodes(op="placeholder") if n.name.startswith("primals")]
    if len(primals) != len(backend_inputs):
        return None
    for node, value in zip(primals, backend_inputs):
        meta = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(meta, torch.Tensor):
            return None
        if (tuple(meta.shape), tuple(meta.stride()), meta.dtype) != (tuple(value.shape), tuple(value.stride()), value.dtype):
            return None
    return list(backend_inputs)


class _RecordingPartitioner(CustomPartitionerFn):
    """Records the joint graph it is given. Then, when the backend's inputs are the
    primals (:func:`_primals_of`), stops the compile (:class:`JointRecorded`); else
    splits the graph as AOTAutograd's default partition does, and the capture runs
    the forward graph to see the tensors it is called with."""

    def __init__(self, recorded: dict, stop: bool):
        self.recorded = recorded
        self.stop = stop

    def __call__(self, joint, joint_inputs, *, num_fwd_outputs, compiler=None, **kw):
        self.recorded["joint"] = joint
        self.recorded["num_fwd_outputs"] = num_fwd_outputs
        primals = _primals_of(joint, self.recorded.get("backend_inputs")) if self.stop else None
        if primals is not None:
            self.recorded["primals"] = primals
            raise JointRecorded()
        return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)

    def uuid(self):
        return None  # a capture runs with AOTAutograd's cache off: never served from a cache


def recording_backend(recorded: dict, executor: str, options: dict | None, model_name: str = "the model") -> Callable:
    """A ``torch.compile`` backend that records, in ``recorded``, the joint graph
    (``"joint"``), its number of forward outputs (``"num_fwd_outputs"``) and the
    tensors its primals stand for (``"primals"``): AOTAutograd's joint graph for
    ``"eager"`` (attention first given back its causal flag and grouped heads,
    :mod:`profiles.causal_sdpa`), Inductor's (its graph passes with ``options``, no
    code generated) for ``"inductor"``. For ``"eager"`` the compile stops at the
    partitioner (:class:`JointRecorded`) when the backend's inputs are the primals one
    to one; otherwise the forward graph runs op by op and its first call's arguments
    are the primals. Call it with AOTAutograd's cache off (``no_aot_autograd_cache``):
    a cache hit records nothing. A graph whose sizes depend on the data is refused
    naming ``model_name`` (:class:`~profiles.capture_errors.DataDependentShape`)."""
    partition = _RecordingPartitioner(recorded, stop=check_executor(executor) == "eager")

    def run_forward(gm):
        def run(*fw_args):
            recorded.setdefault("primals", list(fw_args))
            return gm(*fw_args)

        return run

    if check_executor(executor) == "inductor":
        def run_graph(gm, example, is_backward):
            run = run_forward(gm)
            boxed = lambda args: run(*args)  # noqa: E731  Inductor calls graphs with one list
            boxed._boxed_call = True
            return boxed

        return inductor_capture_backend(partition, run_graph, options)
    aot = aot_autograd(fw_compiler=lambda gm, ex: run_forward(gm), bw_compiler=lambda gm, ex: gm, partition_fn=partition)

    def backend(gm, example_inputs):
        check_static_shapes(gm, model_name)
        recorded["backend_inputs"] = list(example_inputs)
        return aot(gm, example_inputs)

    return with_causal_sdpa(backend)
