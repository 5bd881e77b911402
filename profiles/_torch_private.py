"""Every private torch API the project touches, in one place.

Why: torch.compile's AOTAutograd is the only way to get one joint forward+backward
graph of an arbitrary model (dynamo handles data-dependent Python, tied weights
and buffers), and choosing what forward saves for backward is only exposed
through its private ``partition_fn`` hook and ``_extract_fwd_bwd_modules``. A
torch upgrade that moves these names is a one-file change here. Each import and
function below says why it needs a private name.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch._dynamo.backends.common import aot_autograd  # private: backend factory with partition_fn
from torch._inductor.custom_graph_pass import (  # private module: Inductor's supported partitioner hook
    CustomPartitionerFn,  # ``config.custom_partitioner_fn`` takes an instance; its uuid() keys Inductor's caches
)
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

from ._torch_private_profiler import (  # the profiler's private APIs, in their own file
    allocator_events,
    profiler_active,
    profiler_cpu_memory_events,
    record_function_ranges,
    record_function_span,
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
    "aot_descriptor",
    "mutation_descriptor",
    "quiet_graph_breaks",
    "reads_fake_value",
    "real_tensors",
    "backward_without_autocast",
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
    "CustomPartitionerFn",
    "inductor_capture_backend",
    "no_aot_autograd_cache",
    "inductor_options_of",
    "is_compiled_module",
    "import_inductor_passes",
    "RECOMPUTED",
    "recompute_where_planned",
    "memory_budget_backend",
    "is_compiled_function_node",
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
    break under ``fullgraph=True``, or dynamo's ``UserError`` at a line of the user's
    code (a branch on a data-dependent value, e.g. ``if x.sum().item() > 0:``):
    ``{"file", "line", "function", "code", "reason", "explanation", "hints"}``; ``None``
    for other errors. Private: dynamo's ``Unsupported``/``UserError`` and
    their ``real_stack`` of user frames are the only place the location is kept."""
    from torch._dynamo.exc import Unsupported, UserError

    def first(match):
        seen = exc
        while seen is not None and not match(seen):
            seen = seen.__cause__
        return seen

    seen = first(lambda e: isinstance(e, Unsupported)) or first(
        lambda e: isinstance(e, UserError) and bool(getattr(e, "real_stack", None)))
    if seen is None:
        return None
    stack = list(getattr(seen, "real_stack", None) or [])
    frame = stack[-1] if stack else None
    text = str(seen)
    hints = [line.strip()[len("Hint:"):].strip() for line in text.splitlines() if line.strip().startswith("Hint:")]
    if isinstance(seen, Unsupported):
        reason = seen.gb_type or (text.splitlines()[0] if text else type(seen).__name__)
    elif "data-dependent" in text:
        reason = "Data-dependent branching"
    else:
        reason = text.splitlines()[0] if text else type(seen).__name__
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


def aot_descriptor(desc) -> tuple[str, int] | None:
    """What a joint graph's placeholder or output is, from its AOTAutograd descriptor
    (``node.meta["desc"]``): ``("input"|"output", i)``, the compiled graph's i-th;
    ``("grad", i)``, input i's gradient; ``("tangent", i)``, output i's; ``("mutation", i)``,
    input i's new value (BatchNorm statistics); else ``None``. Private: the classes
    live in ``torch._functorch._aot_autograd.descriptors``."""
    from torch._functorch._aot_autograd import descriptors as d

    if isinstance(desc, d.PlainAOTInput):
        return ("input", desc.idx)
    if isinstance(desc, d.PlainAOTOutput):
        return ("output", desc.idx)
    if isinstance(desc, d.InputMutationAOTOutput) and isinstance(desc.mutated_input, d.PlainAOTInput):
        return ("mutation", desc.mutated_input.idx)
    if isinstance(desc, d.GradAOTOutput) and isinstance(desc.grad_of, d.PlainAOTInput):
        return ("grad", desc.grad_of.idx)
    if isinstance(desc, d.TangentAOTInput) and isinstance(desc.output, d.PlainAOTOutput):
        return ("tangent", desc.output.idx)
    return None


def reads_fake_value(exc: BaseException) -> bool:
    """Whether ``exc`` is a fake tensor asked for its value (``.item()``) outside a
    graph. Private: the exception lives in ``torch._subclasses.fake_tensor``."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    return isinstance(exc, DataDependentOutputException)


def mutation_descriptor(idx: int):
    """The descriptor of a forward output that is input ``idx``'s new value (private: as above)."""
    from torch._functorch._aot_autograd import descriptors as d

    return d.InputMutationAOTOutput(mutated_input=d.PlainAOTInput(idx=idx))


@contextlib.contextmanager
def quiet_graph_breaks():
    """Run the body with dynamo's graph-break warnings (``.item()``, its look at a resumed
    non-leaf tensor's ``.grad``, ``lru_cache`` calls it traces) silenced: the planner reports regions itself.
    Private: they come from the ``torch._dynamo`` logger and its variable builder."""
    log = logging.getLogger("torch._dynamo")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor")
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
            yield
    finally:
        log.setLevel(level)


def real_tensors():
    """Context in which new tensors are real even inside a compiler callback.
    Private: AOTAutograd calls the partitioner under its FakeTensorMode, and
    ``unset_fake_temporarily`` is the only way out of it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


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


def backward_without_autocast():
    """Context in which AOTAutograd traces the backward half of the joint graph with
    autocast off, as eager runs ``loss.backward()`` called outside ``torch.autocast``
    (the usage the AMP documentation prescribes). torch 2.13's default,
    ``backward_pass_autocast="same_as_forward"``, traces it under the forward's
    autocast: an fp32 matmul inside an autocast region (the math attention kernel
    behind ``scaled_dot_product_attention`` with dropout, or code under
    ``autocast(enabled=False)``) gets a bf16/fp16 backward that eager does not run
    (pytorch/pytorch#179804). Private: ``torch._functorch.config`` is the only
    switch. Read when the graph is traced, so it must be active around the first
    call of the compiled module."""
    return torch._functorch.config.patch(backward_pass_autocast="off")


def import_inductor_passes() -> None:
    """Import Inductor's graph passes ahead of its first compilation. Its pre-grad
    passes import ``torch.utils.mkldnn``, whose module body warns (a deprecated
    ``torch.jit.script_method``): under ``-W error`` that import would fail inside
    the compilation. Private: the module is ``torch._inductor.fx_passes.pre_grad``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._inductor.compile_fx  # noqa: F401  (imports the passes)
        import torch._inductor.fx_passes.pre_grad  # noqa: F401


def inductor_capture_backend(partition: CustomPartitionerFn, run_graph, options: dict | None = None):
    """A dynamo backend that takes a graph through Inductor up to code generation:
    its pre-grad passes, its decompositions and its joint-graph passes, then
    ``partition`` (called as Inductor calls ``config.custom_partitioner_fn``), then
    ``run_graph(gm, example_inputs, is_backward)`` instead of generating code for
    each graph returned. So the joint graph ``partition`` sees is the one a real
    Inductor compilation with the same ``options`` partitions, at a fraction of
    its cost. Private: ``compile_fx``'s ``inner_compile`` is the only seam between
    Inductor's graph passes and its code generation."""
    import_inductor_passes()
    from torch._inductor.compile_fx import compile_fx

    patches = {**(options or {}), "custom_partitioner_fn": partition}

    def inner(gm, example_inputs, **kwargs):
        return run_graph(gm, example_inputs, bool(kwargs.get("is_backward", False)))

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches)

    return backend


def no_aot_autograd_cache():
    """Context in which AOTAutograd neither reads nor writes its cache of whole
    compiled steps. A hit there skips the partitioner, so a plan's checks (the
    graph is the planned one) and its bookkeeping (re-simulated shapes) would not
    run; Inductor's FX graph cache, keyed by each already split graph, still
    applies. Private: ``torch._functorch.config`` holds the switch; read when a
    graph is compiled, so it only has to be active around the compiled call."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(enable_autograd_cache=False)


def is_compiled_module(module) -> bool:
    """Whether ``module`` is what ``torch.compile(module)`` returns (an
    ``OptimizedModule``). Private: the class lives in ``torch._dynamo.eval_frame``."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule)


def inductor_options_of(compiled) -> dict | None:
    """The Inductor options a ``torch.compile``-d module was compiled with (those
    that differ from Inductor's defaults; ``mode=`` shows as the options it sets),
    or ``None`` when its backend is not Inductor. ``get_compiler_config()`` is
    public; Inductor's defaults are only in the private ``torch._inductor.config``."""
    config = compiled.get_compiler_config()
    if config is None:
        return None
    import torch._inductor.config as inductor_config

    defaults = inductor_config.get_config_copy()
    return {k: v for k, v in config.items() if k in defaults and defaults[k] != v}


#: ``node.meta`` key marking a node of a backward graph that recomputes a forward value.
RECOMPUTED = "checkpoint_planner_recomputed"


def _recomputes(snode) -> bool:
    """Whether an Inductor scheduler node computes a node marked :data:`RECOMPUTED`."""
    for inner in snode.get_nodes():
        for origin in getattr(getattr(inner, "node", None), "origins", None) or ():
            if origin.meta.get(RECOMPUTED):
                return True
    return False


def recompute_where_planned():
    """Context in which Inductor compiles a step's backward graph along with its
    forward graph, and fuses a recomputation (a node marked :data:`RECOMPUTED`) only
    into the kernels that consume it, never horizontally into an unrelated kernel
    that shares an input. A horizontal fusion of the recomputations of two layers
    (both read the same attention mask, say) runs the later layer's recomputation
    early and keeps its outputs alive in between: measured 4.5 MiB (20%) over the
    planned peak on a 4-layer GPT-2. Private: ``InductorChoices``
    (``torch._inductor.choices``) is Inductor's hook for its fusion heuristics,
    ``V.set_choices_handler`` installs one for this thread, and
    ``force_non_lazy_backward_lowering`` (``torch._functorch.config``) compiles the
    backward graph inside this context rather than at the first backward call."""
    import torch._functorch.config as functorch_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class _RecomputeWherePlanned(InductorChoices):
        @staticmethod
        def can_fuse_horizontal(scheduler, node1, node2, shared_data_score):
            if _recomputes(node1) or _recomputes(node2):
                return False
            return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)

    return _entered(functorch_config.patch(force_non_lazy_backward_lowering=True),
                    lambda: V.set_choices_handler(_RecomputeWherePlanned()))


@contextlib.contextmanager
def _entered(patch, make_handler):
    with patch, make_handler():
        yield


def memory_budget_backend(fraction: float):
    """A ``torch.compile`` backend: Inductor with its own min-cut partitioner under
    ``activation_memory_budget=fraction`` (torch's budget partitioner, for
    comparisons). A backend function of its own per call, so dynamo does not reuse
    code compiled under another fraction. Private: the setting lives in
    ``torch._functorch.config`` and Inductor's entry point in ``torch._inductor.compile_fx``."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    import_inductor_passes()

    def backend(gm, example_inputs):
        with functorch_config.patch(activation_memory_budget=fraction):
            return compile_fx(gm, example_inputs)

    return backend


def is_compiled_function_node(node) -> bool:
    """Whether autograd node ``node`` (a ``grad_fn``) is the backward of AOTAutograd's
    compiled function. Private: its class is made inside AOTAutograd and known by name only."""
    return type(node).__name__ == "CompiledFunctionBackward"
