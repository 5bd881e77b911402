"""``plan()``: check the arguments, capture and profile the step, solve, and package the result as a ``Plan``."""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from profiles.allocator import budget_for, granularity, graph_device_type, usable_bytes
from profiles.capture import capture, normalize_inputs
from profiles.executors import unwrap_compiled
from profiles.joint import JointGraph
from profiles.device import load_device_profile
from profiles.graph_profile import GraphProfile
from profiles.signature import check_input_devices

from .block_ilp import block_solver, peak_lower_bound
from .build import build_plan
from .distributed import EngineBytes
from .engine_setup import EngineSetup, engine_setup, for_graph
from .evaluation import Evaluation
from .fused_recompute import recompute_fused
from .inductor_layout import budget_margin, layout_choice, warn_unmodelled_layouts, with_layout_copies
from .ilp import backend_name, solve_ilp
from .loop_capture import LoopSetup, loop_setup, optimizer_spec
from .memory_model import refine
from .model_record import model_info
from .optimizer_memory import OptimizerSpec
from .plan_type import GiB, ModelInfo, Plan, SolverInfo
from .problem import OBJECTIVES, Problem, build_problem, rank_key
from .search import lowest_plan, search_ilp
from .sqrt import solve_sqrt
from .step_profiles import StepProfiles
from .trim import as_run
from .zero_tangents import profile_as_run

__all__ = [
    "plan",
    "plan_profile",
    "prepare",
    "PreparedStep",
    "BudgetTooSmall",
    "minimum_budget_bytes",
    "SOLVERS",
    "check_budget",
    "check_target",
    "allocator_device_type",
]

SOLVERS = ("auto", "ilp", "blocks", "sqrt")


class BudgetTooSmall(ValueError):
    """The budget is below the lowest peak the planner can reach for this model and input."""

    def __init__(self, budget_bytes: int, min_budget_bytes: int, lower_bound_bytes: int | None = None):
        self.budget_bytes = budget_bytes
        self.min_budget_bytes = min_budget_bytes
        #: A budget no plan can go below by the ILP's memory model (its least-peak LP
        #: relaxation, :func:`planner.block_ilp.peak_lower_bound`, at most the minimum); None: not computed.
        self.lower_bound_bytes = None if lower_bound_bytes is None else min(lower_bound_bytes, min_budget_bytes)
        bound = "" if self.lower_bound_bytes is None else (
            f" (the memory model's LP relaxation bounds it from below at {self.lower_bound_bytes / GiB:.4f} GiB)")
        super().__init__(
            f"budget {budget_bytes / GiB:.4f} GiB is below the minimum of {min_budget_bytes / GiB:.4f} GiB "
            f"({min_budget_bytes} bytes) that this planner can reach for this model and input{bound}; "
            "raise the budget to at least that, or use a smaller batch"
        )


def check_budget(budget_gb: Any) -> int:
    """Validate ``budget_gb`` and return it in bytes."""
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, numbers.Real):
        raise TypeError(f"budget_gb must be a number of GiB (e.g. 2.5), not {type(budget_gb).__name__}")
    value = float(budget_gb)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"budget_gb must be a finite number of GiB above 0, not {budget_gb!r}")
    if value > 2**20:
        raise ValueError(f"budget_gb={budget_gb!r} GiB is absurd (over a PiB); give the budget in GiB")
    return int(value * GiB)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[planner] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Request:
    """What ``plan()`` was asked for, for each dropout mode it plans."""

    #: The budget in bytes.
    budget_bytes: int
    #: ``plan()``'s arguments of the same names.
    solver: str
    target: str | None
    time_limit_s: float
    measure_time: bool
    progress: bool
    objective: str
    #: The data-parallel engine: its bytes per rank and ``Plan.distributed`` (:mod:`planner.engine_setup`).
    engine: EngineSetup
    #: ``Plan.model`` of every plan made.
    model_info: ModelInfo
    #: The training loop around the step (under a data-parallel engine, the optimizer is the engine's).
    loop: LoopSetup | None = None
    #: ``compile_options["layout_optimization"]`` (False: conv plans without channels-last layouts, :mod:`planner.inductor_layout`).
    layout_optimization: bool | None = None


def plan(
    model: torch.nn.Module,
    budget_gb: float,
    example_inputs: Any = None,
    *,
    solver: str = "auto",
    target: str | None = None,
    time_limit_s: float = 60.0,
    measure_time: bool = False,
    progress: bool = False,
    objective: str = "time",
    world_size: int = 1,
    sharding: str = "none",
    optimizer: str | OptimizerSpec = "none",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    grad_accumulation: bool = False,
    executor: str | None = None,
    compile_options: dict | None = None,
    deepspeed: Any = None,
    fsdp_wrap: str = "model",
) -> Plan:
    """Plan activation checkpointing for one training step of ``model``.

    ``budget_gb`` is GiB (2**30 bytes) for everything live on the device from the
    start of forward to the end of backward: parameters, buffers, inputs,
    activations, temporaries and gradients (``torch.cuda.max_memory_allocated``'s
    measure). ``example_inputs`` is a tuple of positional arguments or a dict of
    keyword arguments (default: ``model.example_input_array``). ``solver`` is
    ``"ilp"``, ``"blocks"``, ``"sqrt"`` or ``"auto"`` (the cheaper of the ILP's and
    sqrt(L)'s plans; the ILP solved block by block for a model of many repeated
    blocks, :mod:`planner.block_ilp`; ``"ilp"``/``"blocks"`` fall back to sqrt(L)'s plan
    only when the ILP finds none). ``objective``: what to minimise,
    ``"time"`` (estimated recompute seconds) or ``"flops"`` (recomputed FLOPs, then
    time: never a matmul where pointwise recomputation fits).
    With ``world_size``/``sharding`` (``"ddp"``, ``"fsdp"``) the budget is per rank and
    also holds what the engine keeps on one rank; ``optimizer="adamw"`` there adds
    AdamW's state (see :mod:`planner.distributed`); ``fsdp_wrap="blocks"`` with ``"fsdp"``: FSDP2 on
    each repeated block, then on the model, instead of one group (:mod:`planner.fsdp_blocks`).

    The training loop (:mod:`planner.training_loop`; per rank under an engine): ``loss_fn`` is the
    loss as the loop computes it from the model's outputs (example targets closed
    over), ``loss = loss_fn(wrapped(**batch)); loss.backward()``, with the outputs held
    until backward ends: its forward and backward are in the budget. Without it, a
    model that returns no one-element output gets
    :class:`~planner.loss_phase.LossNotCountedWarning`. ``grad_accumulation=True``: gradients
    exist when the step starts (a micro-step after the first; DDP: ``no_sync()``; not FSDP2, DeepSpeed).
    ``optimizer``: ``"adamw"``, ``"adam"``, ``"sgd"`` (torch's defaults) or a
    :class:`~planner.optimizer_memory.OptimizerSpec` (implementation, momentum...;
    by default the implementation torch picks on the model's device): its state is
    held all step and ``opt.step()`` and ``zero_grad()`` are in the budget.
    ``executor="inductor"`` plans the graph Inductor compiles (after its decompositions,
    with Inductor options ``compile_options``) with Inductor's cost model, for
    ``runtime.apply(model, plan)`` to compile; a ``torch.compile``-d model is planned
    that way by default, with its options (see :mod:`planner.executor`).
    ``deepspeed``: a DeepSpeed config (JSON path or dict) the planned module trains under
    (``deepspeed.initialize(model=runtime.apply(model, plan), ...)``, ZeRO stage 0, 1 or 2):
    the budget is per rank and also holds what that engine keeps on one rank
    (:mod:`planner.deepspeed`); ``world_size`` defaults to the config's.
    Raises :class:`BudgetTooSmall` when no plan fits.
    """
    budget_bytes = check_budget(budget_gb)
    with prepare(model, example_inputs, solver=solver, target=target, time_limit_s=time_limit_s,
                 measure_time=measure_time, progress=progress, objective=objective, world_size=world_size,
                 sharding=sharding, optimizer=optimizer, loss_fn=loss_fn, grad_accumulation=grad_accumulation,
                 executor=executor, compile_options=compile_options, deepspeed=deepspeed, fsdp_wrap=fsdp_wrap) as step:
        return step.plan(budget_bytes)


class PreparedStep:
    """A model's training step captured once (and profiled once per dropout mode), to plan at
    one budget or several (:func:`prepare`). A context manager: leaving it frees the example tensors it holds."""

    __slots__ = ("_profiles", "_request", "_closed")

    def __init__(self, captured: JointGraph, request: _Request):
        self._profiles = StepProfiles(captured, target=request.target, measure_time=request.measure_time)
        self._request = request
        self._closed = False

    def plan(self, budget_bytes: int, *, solver: str | None = None) -> Plan:
        """The plan at ``budget_bytes`` (bytes), as :func:`plan` makes it (with ``solver``
        instead of :func:`prepare`'s when given); raises :class:`BudgetTooSmall` when no plan fits."""
        if self._closed:
            raise RuntimeError("this PreparedStep is closed: plan inside its `with` block")
        request = dataclasses.replace(self._request, budget_bytes=budget_bytes)
        if solver is not None:
            _check_choices(solver, request.objective, request.time_limit_s)
            request = dataclasses.replace(request, solver=solver)
        return _plan_dropout_modes(self._profiles, request)

    def close(self) -> None:
        """Free the example tensors the capture holds."""
        self._profiles.drop_tensors()
        self._closed = True

    def __enter__(self) -> "PreparedStep":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    solver: str = "auto",
    target: str | None = None,
    time_limit_s: float = 60.0,
    measure_time: bool = False,
    progress: bool = False,
    objective: str = "time",
    world_size: int = 1,
    sharding: str = "none",
    optimizer: str | OptimizerSpec = "none",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    grad_accumulation: bool = False,
    executor: str | None = None,
    compile_options: dict | None = None,
    deepspeed: Any = None,
    fsdp_wrap: str = "model",
) -> PreparedStep:
    """Check :func:`plan`'s arguments (all but the budget, which means the same), and
    capture the step once: ``with prepare(model, batch) as step: step.plan(b)`` for
    each budget ``b`` in bytes gives the plans :func:`plan` would."""
    model, executor, compile_options = _resolve_executor(model, executor, compile_options)
    single = sharding == "none" and deepspeed is None
    spec = optimizer_spec(optimizer) if single else None
    engine = engine_setup(model, deepspeed, world_size=world_size, sharding=sharding, fsdp_wrap=fsdp_wrap,
                          optimizer="none" if single else optimizer, grad_accumulation=grad_accumulation)
    args, kwargs = normalize_inputs(model, example_inputs)
    _check_call(model, args, kwargs, solver=solver, objective=objective, time_limit_s=time_limit_s, target=target)
    inputs = kwargs if kwargs else args
    captured = _capture(model, inputs, executor=executor, compile_options=compile_options, progress=progress)
    device_type = _device_type(model, target)
    warn_unmodelled_layouts(captured, device_type, compile_options)
    loop = loop_setup(model, args, kwargs, captured, loss_fn=loss_fn, grad_accumulation=grad_accumulation,
                      optimizer=spec, device_type=device_type, granularity=granularity(device_type))
    request = _Request(
        budget_bytes=0, solver=solver, target=target, time_limit_s=time_limit_s, measure_time=measure_time,
        progress=progress, objective=objective, engine=engine,
        model_info=model_info(model, captured, args, kwargs), loop=loop,
        layout_optimization=(compile_options or {}).get("layout_optimization"),
    )
    return PreparedStep(captured, request)


def _capture(model: torch.nn.Module, inputs, *, executor: str, compile_options: dict | None, progress: bool) -> JointGraph:
    """The model's training step as a joint graph (dropout masks kept), with progress lines."""
    t0 = time.perf_counter()
    _log(progress, f"capturing {type(model).__name__} forward+backward")
    captured = capture(model, inputs, dropout="mask", executor=executor, compile_options=compile_options)
    _log(progress, f"captured {len(captured.gm.graph.nodes)} nodes in {time.perf_counter() - t0:.1f} s")
    return captured


def _resolve_executor(model: torch.nn.Module, executor: str | None, compile_options: dict | None):
    """The model to plan (a ``torch.compile``-d one unwrapped), the executor that will run
    the plan (Inductor for a compiled model unless given) and its compile options."""
    model, compiled_options = unwrap_compiled(model)
    if executor is None:
        executor = "inductor" if compiled_options is not None else "eager"
    return model, executor, compiled_options if compile_options is None else compile_options


def _check_call(model: torch.nn.Module, args: tuple, kwargs: dict, *, solver: str, objective: str,
                time_limit_s: float, target: str | None) -> None:
    """Refuse unknown choices, a target the model cannot run on, and inputs on other devices."""
    _check_choices(solver, objective, time_limit_s)
    check_target(model, target)
    check_input_devices(model, args, kwargs, allow_meta=True)


def _check_choices(solver: str, objective: str, time_limit_s: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if not isinstance(time_limit_s, numbers.Real) or not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be a positive number of seconds, not {time_limit_s!r}")


def _device_type(model: torch.nn.Module, target: str | None) -> str:
    """The device type the step runs on: the model's, or for a meta-device model the
    target profile's (the CPU without one)."""
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type != "meta":
        return param.device.type
    return load_device_profile(target).device_type if target is not None else "cpu"


def _plan_dropout_modes(profiles: StepProfiles, request: _Request) -> Plan:
    """The plan with dropout masks kept (the captured mode); when that does not
    fit, or recomputes, also the plan with masks replayed from the RNG state, and
    the cheaper of both."""
    try:
        first, first_cost = _attempt(profiles, profiles.captured.dropout, request)
    except BudgetTooSmall as too_small:
        if profiles.captured.num_dropouts == 0:
            raise
        # Keeping dropout masks costs a byte per element; regenerating them in
        # backward from the RNG state costs only time. Try that before giving up.
        try:
            _log(request.progress, "budget too small while keeping dropout masks; trying RNG replay")
            return _attempt(profiles, "replay", request)[0]
        except BudgetTooSmall as second:
            bounds = [e.lower_bound_bytes for e in (too_small, second) if e.lower_bound_bytes is not None]
            raise BudgetTooSmall(request.budget_bytes, min(too_small.min_budget_bytes, second.min_budget_bytes),
                                 min(bounds) if len(bounds) == 2 else None) from None
    if profiles.captured.num_dropouts == 0 or first.recompute_time_s == 0:
        return first
    # A plan that recomputes may be cheaper when masks need not be kept: plan
    # that way too and keep the cheaper.
    _log(request.progress, "trying RNG replay of dropout masks, to compare")
    try:
        second, second_cost = _attempt(profiles, "replay", request)
    except BudgetTooSmall:
        return first
    return second if second_cost < first_cost else first


def _attempt(profiles: StepProfiles, dropout: str, request: _Request) -> tuple[Plan, tuple]:
    """The plan for the step with dropout as ``dropout``, and its rank under the objective;
    its time is the recompute time plus, in RNG-replay mode, the extra mask draw each
    dropout makes in forward."""
    gp = profiles.profile(dropout, lambda msg: _log(request.progress, msg))
    engine, info = for_graph(request.engine, gp, granularity(allocator_device_type(gp)))
    p = plan_profile(gp, request.budget_bytes, solver=request.solver, time_limit_s=request.time_limit_s,
                     model_info=request.model_info, progress=request.progress, objective=request.objective,
                     engine=engine, loop=request.loop, layout_optimization=request.layout_optimization)
    if info is not None:
        p = dataclasses.replace(p, distributed=info)
    extra = sum(ni.time_s for ni in gp.nodes.values() if "replay_dropout_mask" in ni.op and ni.phase == "forward")
    cost = p.recompute_time_s + extra
    return p, rank_key(request.objective, flops=p.recompute_flops, time_s=cost)


def check_target(model: torch.nn.Module, target: str | None) -> None:
    """``ValueError`` when ``target`` names a device profile of another kind (CPU or
    GPU) than the device the model is on: its budget margins and allocator model
    would not describe the device that runs the step."""
    if target is None:
        return
    param = next(iter(model.parameters()), None)
    if param is None or param.device.type == "meta":
        return
    profile = load_device_profile(target)
    kind = profile.device_type
    if param.device.type != kind:
        raise ValueError(
            f"target {profile.name!r} is a {'CPU' if kind == 'cpu' else 'GPU'} profile but the model is on "
            f"{param.device}; move the model to the device it will train on (model.to(...)), "
            "or leave target out to use the model's device"
        )


def allocator_device_type(gp: GraphProfile) -> str:
    """``"cuda"`` when the step's memory is counted by the CUDA caching allocator
    (the graph runs on CUDA, or a meta-device model is planned for a GPU's device
    profile), else ``"cpu"``: it decides the block size and the budget's margin
    (:mod:`profiles.allocator`)."""
    if gp.joint.fake:
        dev = gp.device_profile
        return "cuda" if dev is not None and dev.device_type == "cuda" else "cpu"
    return "cuda" if graph_device_type(gp.gm) == "cuda" else "cpu"


def plan_profile(
    gp: GraphProfile,
    budget_bytes: int,
    *,
    solver: str = "auto",
    time_limit_s: float = 60.0,
    model_info: ModelInfo | None = None,
    progress: bool = False,
    objective: str = "time",
    engine: EngineBytes | None = None,
    loop: LoopSetup | None = None,
    layout_optimization: bool | None = None,
) -> Plan:
    """Plan from an already captured and profiled graph; ``model_info``: the plan's
    ``Plan.model`` (default: only the graph's fingerprint); ``engine``: the per-rank
    bytes of a data-parallel engine and optimizer (:func:`planner.distributed.engine_bytes`);
    ``loop``: the training loop around the step (:func:`planner.loop_capture.loop_setup`);
    ``layout_optimization``: False plans Inductor's convolutions on the CPU without
    channels-last layouts (:func:`planner.inductor_layout.layout_choice`)."""
    if model_info is None:
        model_info = ModelInfo(fingerprint=gp.joint.fingerprint)
    elif not isinstance(model_info, ModelInfo):
        raise TypeError(f"model_info must be a planner.ModelInfo (e.g. ModelInfo(fingerprint=..., class_name=...)), "
                        f"not {type(model_info).__name__}")
    device_type = allocator_device_type(gp)
    margin = budget_margin(gp.joint, device_type)
    # Inductor's channels-last layouts for convolutions on the CPU: their copies counted (or the layouts off)
    inductor_options = layout_choice(gp.joint, device_type, layout_optimization)
    gp = profile_as_run(gp, loss=loop.loss if loop is not None else None, blocks=engine is not None and engine.blocks is not None)
    engine, gp = with_layout_copies(engine, gp, inductor_options)
    prob = build_problem(gp, granularity=granularity(device_type), objective=objective, engine=engine,
                         loop=loop.loop if loop is not None else None)
    baseline = prob.evaluate(frozenset())
    _log(progress, f"no-checkpoint peak {baseline.sim.peak_bytes / GiB:.4f} GiB, budget {budget_bytes / GiB:.4f} GiB")
    if baseline.sim.peak_bytes <= budget_bytes * (1 - margin):
        ev, info = baseline, SolverInfo(name="none", status="budget fits without recomputation", seconds=0.0)
    else:
        ev, info = _solve(prob, budget_bytes, device_type, solver=solver, time_limit_s=time_limit_s, progress=progress)
    fused = recompute_fused(prob, ev, usable_bytes(budget_bytes, device_type, margin))
    if fused is not ev:
        ev, info = fused, dataclasses.replace(info, status=f"{info.status}; fused values recomputed")
    p = build_plan(prob, ev, baseline=baseline, budget_bytes=budget_bytes,
                   solver=dataclasses.replace(info, objective=objective),
                   model_info=model_info)
    p = dataclasses.replace(p, inductor_options=inductor_options)
    return p if loop is None else dataclasses.replace(p, training_loop=loop.info(p.timeline))


def _solve(prob: Problem, budget_bytes: int, device_type: str, *, solver: str, time_limit_s: float,
           progress: bool) -> tuple[Evaluation, SolverInfo]:
    """The plan within the budget less its margin: sqrt(L)'s, the ILP's, or for
    ``"auto"`` the cheaper of both (each checked by exact simulation); for
    ``"ilp"`` sqrt(L)'s plan only when the ILP found none. When none fits, the
    lowest plan if it fits, else :class:`BudgetTooSmall` with the minimum budget."""
    usable = usable_bytes(budget_bytes, device_type, extra := budget_margin(prob.gp.joint, device_type))
    search = prob.unarranged()  # the solvers search the graphs as split; the plan found is then arranged
    best: tuple[Evaluation, SolverInfo] | None = None
    _log(progress, "trying sqrt(L) segments")
    sq = solve_sqrt(search, usable)
    sq_found = None
    if sq.evaluation is not None:
        sq_info = SolverInfo(name="sqrt", status=f"{sq.status}, {sq.segments} segments", seconds=sq.seconds, calls=len(sq.tried))
        sq_found = (sq.evaluation, sq_info)
    blocks = block_solver(search, always=solver == "blocks") if solver in ("auto", "blocks") else None
    solve = blocks if blocks is not None else solve_ilp
    if solver in ("ilp", "auto", "blocks"):
        # the exact live intervals of a plan that fits: a good start
        memory = refine(prob.memory, sq.evaluation) if sq.evaluation is not None else prob.memory
        _log(progress, "solving ILP" + (f" ({blocks.describe()})" if blocks is not None else ""))
        best = _named(search_ilp(search, usable, time_limit_s, start=sq.evaluation, memory=memory, solve=solve), blocks)
    if sq_found is not None and (solver == "sqrt" or best is None or (solver == "auto" and prob.rank(sq_found[0]) < prob.rank(best[0]))):
        best = sq_found
    run = None if best is None else as_run(prob, best, usable, trimmed=solver != "sqrt")
    if run is not None:
        return run
    _log(progress, "no plan fits; computing the minimum budget")
    # the flat ILP's lowest plan, as minimum_budget_bytes finds it: the block ILP's copies
    # sharing decisions may not reach as low
    low_ev, low_info = _named(lowest_plan(search, time_limit_s), None)
    run = as_run(prob, (low_ev, low_info), usable, trimmed=solver != "sqrt")
    if run is not None:
        return run
    bound = peak_lower_bound(search) if backend_name() == "highs" else None
    raise BudgetTooSmall(budget_bytes, budget_for(prob.evaluate(low_ev.recompute).sim.peak_bytes, device_type, extra),
                         None if bound is None else budget_for(int(bound), device_type, extra))


def _named(found: tuple[Evaluation, SolverInfo] | None, blocks) -> tuple[Evaluation, SolverInfo] | None:
    """``found`` with the ILP's backend in its record, and the blocks when solved block by block."""
    if found is None or found[1].name != "ilp":
        return found
    ev, info = found
    if blocks is not None:
        return ev, dataclasses.replace(info, status=f"{info.status}; {blocks.describe()}", backend="highs")
    return ev, dataclasses.replace(info, backend=backend_name())


def minimum_budget_bytes(gp_or_problem: GraphProfile | Problem, *, time_limit_s: float = 60.0) -> int:
    """The smallest budget (bytes) the planner can plan for, for a profiled graph."""
    if isinstance(gp_or_problem, Problem):
        prob = gp_or_problem
        device_type = allocator_device_type(prob.gp)
    else:
        device_type = allocator_device_type(gp_or_problem)
        prob = build_problem(gp_or_problem, granularity=granularity(device_type))
    # the lowest plan the solvers find on the graphs as split, as the runtime runs it (arranged)
    low = lowest_plan(prob.unarranged(), time_limit_s)[0]
    return budget_for(prob.evaluate(low.recompute).sim.peak_bytes, device_type, budget_margin(prob.gp.joint, device_type))
