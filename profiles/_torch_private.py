"""Every private torch API the project touches, in one place.

Why: torch.compile's AOTAutograd is the only way to get one joint forward+backward
graph of an arbitrary model (dynamo handles data-dependent Python, tied weights
and buffers), and choosing what forward saves for backward is only exposed
through its private ``partition_fn`` hook and ``_extract_fwd_bwd_modules``. A
torch upgrade that moves these names is a one-file change here.
"""

from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd  # private: backend factory with partition_fn
from torch._functorch.partitioners import (  # private: the partitioner's building block
    _extract_fwd_bwd_modules as extract_fwd_bwd_modules,
)
from torch.fx.graph import CodeGen


class _BoxedCodeGen(CodeGen):
    """Generated ``forward(self, args_list)`` that takes its inputs out of the list
    and clears it, so each input is freed after its last use (the convention
    AOTAutograd's runtime calls "boxed"; torch 2.12+ ships the same as
    ``torch.fx.graph._BoxedCodeGen``, written out here for older versions)."""

    def gen_fn_def(self, free_vars, maybe_return_annotation, **kwargs):
        name = getattr(self, "_func_name", "forward")
        fn_def = f"def {name}(self, args_list){maybe_return_annotation}:"
        names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v != "self"]
        if names:
            fn_def += "\n    args_iter = iter(args_list)"
            for var in names:
                fn_def += f"\n    {var} = next(args_iter)"
            fn_def += "\n    args_list.clear()"
        return fn_def

__all__ = [
    "aot_autograd",
    "copy_graph_module",
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
    "fake_tensor_mode",
    "no_ddp_graph_split",
    "is_nondeterministic_seeded",
]


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
    gm.graph.set_codegen(_BoxedCodeGen())
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
    if hasattr(cfg, "recompile_limit"):
        cfg.recompile_limit = max(cfg.recompile_limit, count)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, count * 4)
    else:  # older name
        cfg.cache_size_limit = max(cfg.cache_size_limit, count)
    # Logging calls inside forward (Hugging Face's ``logger.warning_once``) would
    # break the graph; inside compiled regions they become no-ops instead.
    import logging

    for name in ("debug", "info", "warning", "warn", "warning_once", "info_once", "warning_advice"):
        fn = getattr(logging.Logger, name, None)
        if fn is not None:
            getattr(cfg, "ignore_logging_functions", getattr(cfg, "ignore_logger_methods", set())).add(fn)


def backend_error_cause(exc: BaseException) -> BaseException | None:
    """The exception our own backend code raised inside torch.compile, if any."""
    from torch._dynamo.exc import BackendCompilerFailed

    seen = exc
    while seen is not None:
        if isinstance(seen, BackendCompilerFailed):
            return getattr(seen, "inner_exception", None) or seen.__cause__
        seen = seen.__cause__
    return None


def graph_break_info(exc: BaseException) -> dict | None:
    """Where and why dynamo stopped tracing, when ``exc`` (or its cause) is a graph
    break under ``fullgraph=True``: ``{"file", "line", "function", "code", "reason",
    "hints"}``; ``None`` for other errors. Private: dynamo's ``Unsupported`` and its
    ``real_stack`` of user frames are the only place the break's location is kept."""
    from torch._dynamo.exc import Unsupported

    seen = exc
    while seen is not None and not isinstance(seen, Unsupported):
        seen = seen.__cause__
    if seen is None:
        return None
    stack = list(getattr(seen, "real_stack", None) or [])
    frame = stack[-1] if stack else None
    text = str(seen)
    hints = [line.strip()[len("Hint:"):].strip() for line in text.splitlines() if line.strip().startswith("Hint:")]
    reason = getattr(seen, "gb_type", None) or (text.splitlines()[0] if text else type(seen).__name__)
    explanation = next((line.strip()[len("Explanation:"):].strip() for line in text.splitlines() if line.strip().startswith("Explanation:")), "")
    return {
        "file": getattr(frame, "filename", None),
        "line": getattr(frame, "lineno", None),
        "function": getattr(frame, "name", None),
        "code": (getattr(frame, "line", "") or "").strip(),
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


def is_nondeterministic_seeded(target) -> bool:
    """Whether an fx node's ``target`` is an ATen operator tagged
    ``nondeterministic_seeded`` (a random op: it draws from the generator).
    Private: ``torch._ops.OpOverload`` is the only type that carries ATen tags."""
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags
