"""Every private torch API the project touches, in one place.

Why: torch.compile's AOTAutograd is the only way to get one joint forward+backward
graph of an arbitrary model (dynamo handles data-dependent Python, tied weights
and buffers), and choosing what forward saves for backward is only exposed
through its private ``partition_fn`` hook and ``_extract_fwd_bwd_modules``. A
torch upgrade that moves these names is a one-file change here. Each import and
function below says why it needs a private name.
"""

from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd  # private: backend factory with partition_fn
from torch._functorch.partitioners import (  # private: the partitioner's building blocks
    _extract_fwd_bwd_modules as extract_fwd_bwd_modules,
    default_partition,  # private: AOTAutograd's own partition, run after the joint graph is recorded
)
from torch._ops import OpOverload  # private module: the type of every ``torch.ops`` overload in a graph
from torch.fx.graph import _BoxedCodeGen  # private: codegen of AOTAutograd's boxed calling convention
from torch.multiprocessing.reductions import StorageWeakRef  # private: the hashable identity of a storage
from torch.utils._pytree import (  # private: torch has no public pytree; fx args and meta values are its containers
    tree_leaves,
    tree_map,
    tree_map_only,
)

__all__ = [
    "aot_autograd",
    "copy_graph_module",
    "default_partition",
    "extract_fwd_bwd_modules",
    "make_boxed",
    "allow_recompiles",
    "keep_random_ops",
    "backend_error_cause",
    "graph_break_info",
    "real_tensors",
    "profiler_active",
    "allocator_events",
    "record_function_span",
    "record_function_ranges",
    "profiler_cpu_memory_events",
    "fake_tensor_mode",
    "no_ddp_graph_split",
    "is_op_overload",
    "is_random_op",
    "op_is_mutable",
    "storage_key",
    "tree_leaves",
    "tree_map",
    "tree_map_only",
]


def is_op_overload(target) -> bool:
    """Whether an fx node's ``target`` is a ``torch.ops`` operator overload (aten or a
    custom op such as ``planner_rng``), not a higher-order op or a Python callable.
    Private: ``OpOverload`` lives in ``torch._ops``; torch exports no public name for it."""
    return isinstance(target, OpOverload)


def is_random_op(target) -> bool:
    """Whether ``target`` is an operator overload tagged ``nondeterministic_seeded``:
    it draws from a random generator, so running it again gives other numbers."""
    return isinstance(target, OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def op_is_mutable(target: OpOverload) -> bool:
    """Whether operator overload ``target`` mutates one of its arguments. Private: the
    overload's schema is only reachable as ``OpOverload._schema``."""
    return target._schema.is_mutable


def storage_key(tensor: torch.Tensor) -> StorageWeakRef:
    """A hashable key equal for two tensors exactly when they share a storage; works
    for fake tensors (which have no data pointer). Private: ``StorageWeakRef`` is
    the key AOTAutograd's own alias analysis uses."""
    return StorageWeakRef(tensor.untyped_storage())


def fake_tensor_mode():
    """A new ``FakeTensorMode``: tensors with shapes, strides, dtypes and a device
    but no storage. Private (``torch._subclasses``) but the only way to trace a
    model on a real device's kernels without allocating it (a model built on the
    meta device, see :mod:`profiles.meta`); torch.export relies on the same class."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def make_boxed(gm: torch.fx.GraphModule):
    """Return ``gm`` as a boxed callable: it takes one list and clears it, so each
    input is freed after its last use instead of living until the call returns."""
    gm.graph.set_codegen(_BoxedCodeGen())  # private: the codegen AOTAutograd's own boxed graphs use
    gm.recompile()
    forward = gm.forward

    def run(args):
        return forward(args)

    run._boxed_call = True  # read by AOTAutograd's runtime
    return run


def keep_random_ops():
    """Context in which fx dead-code elimination keeps random ops with unused
    outputs. Inside torch.compile, ``eliminate_dead_code`` treats random ops as pure
    unless inductor's ``fallback_random`` is set; a dropout whose outputs are all
    rebuilt from a replayed mask must still run, or the generator would not
    advance as it does in eager."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(fallback_random=True)


def allow_recompiles(count: int = 256) -> None:
    """Raise dynamo's recompile limit. Every capture and every applied plan
    compiles the same ``forward`` code object again with another backend; past
    the default limit of 8 dynamo would silently fall back to eager."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, count)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, count * 4)
    # Logging calls inside forward (Hugging Face's ``logger.warning_once``) would
    # break the graph; inside compiled regions they become no-ops instead. The
    # ``*_once`` and ``warning_advice`` methods exist once transformers has added them.
    import logging

    for name in ("debug", "info", "warning", "warn", "warning_once", "info_once", "warning_advice"):
        fn = getattr(logging.Logger, name, None)
        if fn is not None:
            cfg.ignore_logging_functions.add(fn)


def backend_error_cause(exc: BaseException) -> BaseException | None:
    """The exception our own backend code raised inside torch.compile, if any."""
    from torch._dynamo.exc import BackendCompilerFailed

    seen = exc
    while seen is not None:
        if isinstance(seen, BackendCompilerFailed):
            return seen.inner_exception
        seen = seen.__cause__
    return None


def graph_break_info(exc: BaseException) -> dict | None:
    """Where and why dynamo stopped tracing, when ``exc`` (or its cause) is a graph
    break under ``fullgraph=True``: ``{"file", "line", "function", "code", "reason",
    "explanation", "hints"}``; ``None`` for other errors. Private: dynamo's ``Unsupported`` and its
    ``real_stack`` of user frames are the only place the break's location is kept."""
    from torch._dynamo.exc import Unsupported

    seen = exc
    while seen is not None and not isinstance(seen, Unsupported):
        seen = seen.__cause__
    if seen is None:
        return None
    stack = list(seen.real_stack or [])
    frame = stack[-1] if stack else None
    text = str(seen)
    hints = [line.strip()[len("Hint:"):].strip() for line in text.splitlines() if line.strip().startswith("Hint:")]
    reason = seen.gb_type or (text.splitlines()[0] if text else type(seen).__name__)
    explanation = next((line.strip()[len("Explanation:"):].strip() for line in text.splitlines() if line.strip().startswith("Explanation:")), "")
    return {
        "file": frame.filename if frame else None,
        "line": frame.lineno if frame else None,
        "function": frame.name if frame else None,
        "code": (frame.line or "").strip() if frame else "",
        "reason": reason,
        "explanation": explanation,
        "hints": hints,
    }


def real_tensors():
    """Context in which new tensors are real even inside a compiler callback.
    Private: AOTAutograd calls the partitioner under its FakeTensorMode, and
    ``unset_fake_temporarily`` is the only way out of it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def profiler_active() -> bool:
    """Whether a ``torch.profiler``/autograd profiler session is running: a nested
    session would end the caller's. Private: the only query torch offers."""
    return bool(torch._C._autograd._profiler_enabled())


def _event_tree(prof):
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.children)


def allocator_events(prof) -> list[tuple[int, int, int]]:
    """``(start ns, address, signed bytes)`` of every CPU allocator event of a
    finished ``torch.profiler`` session (``profile_memory=True``). Private: the
    public events carry no addresses; the result's event tree does."""
    allocation = torch._C._profiler._EventType.Allocation
    return [
        (e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size)
        for e in _event_tree(prof)
        if e.tag == allocation and e.extra_fields.device.type == "cpu"
    ]


def record_function_span(prof, name: str) -> tuple[int, int] | None:
    """``(start ns, end ns)`` of the first ``record_function(name)`` range of a finished
    ``torch.profiler`` session, on the clock of :func:`allocator_events`; None if absent."""
    for e in _event_tree(prof):
        if e.name == name:
            return e.start_time_ns, e.end_time_ns
    return None


def _kineto_events(prof) -> list:
    """The events of a finished ``torch.profiler`` session, by start time. Private:
    ``kineto_results`` is the only place that gives allocator events' byte counts
    on the same clock as ``record_function`` ranges."""
    return sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())


def record_function_ranges(prof, prefix: str) -> list[tuple[int, int, str]]:
    """``(start ns, end ns, name without prefix)`` of every ``record_function`` range
    of a finished ``torch.profiler`` session whose name starts with ``prefix``, by start."""
    ranges = []
    for e in _kineto_events(prof):
        name = e.name()
        if name.startswith(prefix):
            ranges.append((e.start_ns(), e.start_ns() + e.duration_ns(), name[len(prefix):]))
    return ranges


def profiler_cpu_memory_events(prof) -> list[tuple[int, int]]:
    """``(start ns, signed bytes)`` of every CPU allocator event of a finished
    ``torch.profiler`` session (``profile_memory=True``), by time, on the clock of
    :func:`record_function_ranges`."""
    cpu = torch.autograd.DeviceType.CPU
    return [(e.start_ns(), e.nbytes()) for e in _kineto_events(prof) if e.name() == "[memory]" and e.device_type() == cpu]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` with its own nodes; node metadata (fake values included) is
    shared. Private: ``Graph._codegen`` has no public getter, and ``copy.deepcopy``
    of a graph deep-copies its pytree specs, which warns on torch 2.13."""
    import copy

    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    if out is not None:
        value, old_output = out
        graph.output(value, type_expr=getattr(old_output, "type", None)).meta = copy.copy(old_output.meta)
    graph.set_codegen(gm.graph._codegen)
    return torch.fx.GraphModule(gm, graph)


def no_ddp_graph_split():
    """Context in which dynamo compiles a module running inside DDP's forward as one
    graph. By default (``optimize_ddp=True``) dynamo's DDPOptimizer splits the graph
    at DDP's gradient-bucket boundaries and compiles each piece with our backend, so
    the partition hook would see pieces of the joint graph, not the one the plan was
    made for (PlanMismatch, or an assertion inside DDPOptimizer). With
    ``"no_optimization"`` DDP's C++ reducer all-reduces the gradients after the
    compiled backward (no communication/computation overlap). Read when a frame is
    compiled, so it only has to be active around the compiled call."""
    return torch._dynamo.config.patch(optimize_ddp=False)

