"""``plan()``: capture, profile, solve, and package the result as a ``Plan``."""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import time
from typing import Any

import torch

from profiles.capture import capture, normalize_inputs, with_dropout
from profiles.device import load_device_profile
from profiles.graph_profile import GraphProfile, profile_graph
from profiles.signature import check_input_devices, describe_inputs, parameter_signature

from .distributed import Distributed, EngineBytes, engine_bytes, record
from .ilp import solve_ilp
from .plan_type import GiB, NodeDecision, Plan, SolverInfo
from .problem import OBJECTIVES, Evaluation, Problem, build_problem, rank_key
from .sqrt import solve_sqrt

__all__ = ["plan", "plan_profile", "BudgetTooSmall", "minimum_budget_bytes", "SOLVERS"]

SOLVERS = ("auto", "ilp", "sqrt")
_MAX_STALE = 2

#: Plans that recompute keep this fraction of the budget unused. On CPU the
#: simulator sees every tensor but not the few-byte scalars some ops allocate on
#: the side. On CUDA the caching allocator counts whole blocks (a reused block is
#: only split when enough remains), which measured 3.8-5.0% above the simulated
#: peak on an H200 (bench/results/gpu_check_h200.json).
SAFETY = {"cpu": 0.001, "cuda": 0.06}


def _margin(device_type: str) -> float:
    return SAFETY.get(device_type, SAFETY["cuda"])


def _usable(budget_bytes: int, device_type: str = "cpu") -> int:
    """Bytes a recomputing plan may use of ``budget_bytes``."""
    return int(math.floor(budget_bytes * (1 - _margin(device_type))))


def _budget_for(peak_bytes: int, device_type: str = "cpu") -> int:
    """The smallest budget whose usable part holds ``peak_bytes``."""
    return int(math.ceil(peak_bytes / (1 - _margin(device_type)))) + 1


class BudgetTooSmall(ValueError):
    """The budget is below the lowest peak the planner can reach for this model and input."""

    def __init__(self, budget_bytes: int, min_budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.min_budget_bytes = min_budget_bytes
        super().__init__(
            f"budget {budget_bytes / GiB:.4f} GiB is below the minimum of {min_budget_bytes / GiB:.4f} GiB "
            f"({min_budget_bytes} bytes) that this planner can reach for this model and input; "
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
    optimizer: str = "none",
) -> Plan:
    """Plan activation checkpointing for one training step of ``model``.

    ``budget_gb`` is GiB (2**30 bytes) for everything live on the device from the
    start of forward to the end of backward: parameters, buffers, inputs,
    activations, temporaries and gradients (``torch.cuda.max_memory_allocated``'s
    measure). ``example_inputs`` is a tuple of positional arguments or a dict of
    keyword arguments (default: ``model.example_input_array``). ``solver`` is
    ``"ilp"``, ``"sqrt"`` or ``"auto"`` (the cheaper of both; ``"ilp"`` falls back to
    sqrt(L)'s plan only when the ILP finds none). ``objective``: what to minimise,
    ``"time"`` (estimated recompute seconds) or ``"flops"`` (recomputed FLOPs, then
    time: never a matmul where pointwise recomputation fits).
    With ``world_size``/``sharding`` (``"ddp"``, ``"fsdp"``) the budget is per rank and
    also holds what the engine keeps on one rank; ``optimizer="adamw"`` adds AdamW's
    state, so the budget can be the device's whole memory (see :mod:`planner.distributed`).
    Raises :class:`BudgetTooSmall` when no plan fits.
    """
    budget_bytes = check_budget(budget_gb)
    dist_cfg = Distributed(world_size=world_size, sharding=sharding, optimizer=optimizer)
    engine = engine_bytes(model, dist_cfg) if dist_cfg.active else None
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if not isinstance(time_limit_s, numbers.Real) or not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be a positive number of seconds, not {time_limit_s!r}")
    args, kwargs = normalize_inputs(model, example_inputs)
    check_target(model, target)
    check_input_devices(model, args, kwargs, allow_meta=True)
    inputs = kwargs if kwargs else args

    t0 = time.perf_counter()
    _log(progress, f"capturing {type(model).__name__} forward+backward")
    captured = capture(model, inputs, dropout="mask")
    _log(progress, f"captured {len(captured.gm.graph.nodes)} nodes in {time.perf_counter() - t0:.1f} s")
    model_info = {
        "fingerprint": captured.fingerprint,
        "class": type(model).__name__,
        "inputs": describe_inputs(args, kwargs),
        "structure": captured.structure,
        "graph": captured.node_digests,
        "parameters": parameter_signature(model),
    }

    def attempt(joint) -> tuple[Plan, tuple]:
        """The plan for ``joint``, and its rank under the objective; its time is the
        recompute time plus, in RNG-replay mode, the extra mask draw each dropout
        makes in forward."""
        _log(progress, f"profiling (dropout: {joint.dropout})")
        gp = profile_graph(joint, target=target, measure_time=measure_time)
        p = plan_profile(gp, budget_bytes, solver=solver, time_limit_s=time_limit_s, model_info=model_info,
                         progress=progress, objective=objective, engine=engine)
        if engine is not None:
            p = dataclasses.replace(p, distributed=record(dist_cfg, engine))
        extra = sum(ni.time_s for ni in gp.nodes.values() if "replay_dropout_mask" in ni.op and ni.phase == "forward")
        cost = p.recompute_time_s + extra
        return p, rank_key(objective, flops=p.recompute_flops, time_s=cost)

    try:
        try:
            first, first_cost = attempt(captured)
        except BudgetTooSmall as too_small:
            if captured.num_dropouts == 0:
                raise
            # Keeping dropout masks costs a byte per element; regenerating them in
            # backward from the RNG state costs only time. Try that before giving up.
            try:
                _log(progress, "budget too small while keeping dropout masks; trying RNG replay")
                return attempt(with_dropout(captured, "replay"))[0]
            except BudgetTooSmall as second:
                raise BudgetTooSmall(budget_bytes, min(too_small.min_budget_bytes, second.min_budget_bytes)) from None
        if captured.num_dropouts == 0 or first.recompute_time_s == 0:
            return first
        # A plan that recomputes may be cheaper when masks need not be kept: plan
        # that way too and keep the cheaper.
        _log(progress, "trying RNG replay of dropout masks, to compare")
        try:
            second, second_cost = attempt(with_dropout(captured, "replay"))
        except BudgetTooSmall:
            return first
        return second if second_cost < first_cost else first
    finally:
        captured.drop_tensors()


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


def _granularity(gp: GraphProfile) -> int:
    if gp.joint.fake:  # a meta-device model: planned for the target's allocator
        dev = gp.device_profile
        return 512 if dev is not None and dev.device_type == "cuda" else 1
    for n in gp.gm.graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.device.type == "cuda":
            return 512  # the CUDA caching allocator rounds every block to 512 bytes
    return 1


def plan_profile(
    gp: GraphProfile,
    budget_bytes: int,
    *,
    solver: str = "auto",
    time_limit_s: float = 60.0,
    model_info: dict | None = None,
    progress: bool = False,
    objective: str = "time",
    engine: EngineBytes | None = None,
) -> Plan:
    """Plan from an already captured and profiled graph; ``engine``: the per-rank
    bytes of a data-parallel engine and optimizer (:func:`planner.distributed.engine_bytes`)."""
    prob = build_problem(gp, granularity=_granularity(gp), objective=objective, engine=engine)
    baseline = prob.evaluate(frozenset())
    _log(progress, f"no-checkpoint peak {baseline.sim.peak_bytes / GiB:.4f} GiB, budget {budget_bytes / GiB:.4f} GiB")
    info = model_info or {"fingerprint": gp.joint.fingerprint}

    def package(ev: Evaluation, solver_info: SolverInfo) -> Plan:
        solver_info = dataclasses.replace(solver_info, objective=objective)
        return _make_plan(prob, ev, baseline, budget_bytes, solver_info, info)

    if baseline.sim.peak_bytes <= budget_bytes:
        return package(baseline, SolverInfo(name="none", status="budget fits without recomputation", seconds=0.0))

    device_type = "cuda" if prob.granularity > 1 else "cpu"
    usable = _usable(budget_bytes, device_type)
    best: tuple[Evaluation, SolverInfo] | None = None
    _log(progress, "trying sqrt(L) segments")
    sq = solve_sqrt(prob, usable)
    sq_found = None
    if sq.evaluation is not None:
        sq_info = SolverInfo(name="sqrt", status=f"{sq.status}, {sq.segments} segments", seconds=sq.seconds, calls=len(sq.tried))
        sq_found = (sq.evaluation, sq_info)
    if solver in ("ilp", "auto"):
        if sq.evaluation is not None:
            prob.refine(sq.evaluation)  # exact live intervals of a plan that fits: a good start
        _log(progress, "solving ILP")
        best = _search_ilp(prob, usable, time_limit_s, start=sq.evaluation)
    if sq_found is not None and (solver == "sqrt" or best is None or (solver == "auto" and prob.rank(sq_found[0]) < prob.rank(best[0]))):
        # auto: the cheaper of the two, both checked by exact simulation; ilp: the
        # sqrt(L) plan only when the ILP found none within the budget
        best = sq_found
    if best is None:
        _log(progress, "no plan fits; computing the minimum budget")
        low_ev, low_info = _lowest(prob, time_limit_s)
        if low_ev.sim.peak_bytes <= usable:
            return package(low_ev, low_info)
        raise BudgetTooSmall(budget_bytes, _budget_for(low_ev.sim.peak_bytes, device_type))
    return package(*best)


def _search_ilp(prob: Problem, budget: int, time_limit_s: float, *, max_calls: int = 16, start: Evaluation | None = None):
    """Solve the ILP, check each solution by exact simulation, and adjust.

    The ILP's memory rows use estimated live intervals for recomputed values.
    After each solve the estimates of the values the solution saves or recomputes
    are replaced by the exact intervals of its simulated schedule
    (``Problem.refine``), and a solution over the budget is solved again under the
    corrected rows. Corrections can alternate between solutions (each shows the
    exact intervals of different values), so after ``_MAX_STALE`` corrected
    solutions in a row still over the budget, or when the rows were already exact,
    the ILP's internal budget is tightened by the overshoot; a fitting solution
    found under a tightened internal budget loosens it again by the slack. When
    even the first solve finds nothing although ``start`` (sqrt(L)'s plan) fits,
    the rows overestimate: the internal budget is loosened once by their error on
    ``start``. Returns the cheapest fitting solution, or None.
    """
    t0 = time.perf_counter()
    best: Evaluation | None = None
    status, gap, calls = "Infeasible", None, 0
    internal = float(budget)
    seen: set[frozenset] = set()
    stale = 0  # solutions over the budget in a row, re-solved under corrected rows
    relaxed = False
    while calls < max_calls:
        remaining = time_limit_s - (time.perf_counter() - t0)
        if remaining <= 0.5:
            break
        res = solve_ilp(prob, internal, time_limit_s=remaining)
        calls += 1
        if res.recompute is None:
            if best is None and start is not None and not relaxed:
                # The rows overestimate: even the known fitting start is over the
                # budget under them. Loosen the internal budget by their error there.
                relaxed = True
                error = prob.model_peak_of(start) - start.sim.peak_bytes
                if error > 0:
                    internal += error
                    continue
            break  # nothing fits the (internal) budget under the current rows
        ev = prob.evaluate(res.recompute)
        changed = prob.refine(ev)
        repeated = res.recompute in seen
        seen.add(res.recompute)
        if ev.sim.peak_bytes <= budget:
            stale = 0
            improved = best is None or _better(prob.rank(ev), prob.rank(best), 1e-3)
            if best is None or prob.rank(ev) < prob.rank(best):
                best, status, gap = ev, res.status, res.gap
            slack = budget - ev.sim.peak_bytes
            if repeated or not improved or (not changed and (internal >= budget or slack <= 0.002 * budget)):
                break
            if not changed:
                internal = min(float(budget), internal + slack)
        elif changed and not repeated and stale < _MAX_STALE:
            stale += 1  # the rows were corrected: solve again under them
        else:
            stale = 0
            internal -= ev.sim.peak_bytes - budget + 0.001 * budget
    if best is None:
        return None
    return best, SolverInfo(name="ilp", status=status, seconds=time.perf_counter() - t0, gap=gap, calls=calls)


def _better(a: tuple, b: tuple, rel: float) -> bool:
    """``a`` ranks below ``b`` by more than ``rel`` in its first differing term."""
    for x, y in zip(a, b):
        if x != y:
            return x < y * (1 - rel)
    return False


#: Minimum-memory ILP paths tried by ``_lowest``: the plain one; when its lowest
#: peak is within 5% of the best found (sqrt(L)'s included), one whose tie-breaking
#: weights are perturbed, then more for as long as each lowers the best peak (at
#: most this many). On GPT-2 the plain path's lowest is 20-100% above sqrt(L)'s and
#: no other path is tried. The linear memory model misjudges some recomputed
#: values' lifetimes, so where a path settles depends on near-ties; on the
#: benchmark ResNet the first perturbed path reached 90.1 MiB where the plain one
#: settled at 97.9.
_LOWEST_PATHS = 5


def _lowest(prob: Problem, time_limit_s: float) -> tuple[Evaluation, SolverInfo]:
    """The lowest-peak plan found by the ILP (minimising memory, several paths) and
    sqrt(L). The same whatever was solved before, and whatever the objective (the ILP
    breaks ties between equally low peaks by recompute time)."""
    start = time.perf_counter()
    options: list[tuple[Evaluation, str]] = []
    sq = solve_sqrt(prob, None)
    if sq.evaluation is not None:
        options.append((sq.evaluation, f"sqrt minimum memory, {sq.segments} segments"))
    options.append((prob.evaluate(frozenset(prob.can_recompute)), "recompute everything"))
    objective, prob.objective = prob.objective, "time"
    try:
        best_peak = None
        for path in range(_LOWEST_PATHS):
            if time_limit_s - (time.perf_counter() - start) <= 0.5:
                break
            lowest = min(o[0].sim.peak_bytes for o in options)
            if path == 1:
                ilp_lowest = min((o[0].sim.peak_bytes for o in options if o[1].startswith("ilp")), default=None)
                if ilp_lowest is None or ilp_lowest > 1.05 * lowest:
                    break  # the ILP's memory model is far off here: other paths will not win
            elif path >= 2 and lowest == best_peak:
                break  # the last path found nothing lower
            best_peak = lowest
            prob.reset_intervals()
            prob.ilp_rows.clear()
            prob.tie_break_seed = None if path == 0 else path
            for _ in range(8):  # refine the ILP's live intervals from each exact schedule
                remaining = time_limit_s - (time.perf_counter() - start)
                if remaining <= 0.5:
                    break
                res = solve_ilp(prob, None, time_limit_s=remaining, minimize_memory=True)
                if res.recompute is None:
                    break
                ev = prob.evaluate(res.recompute)
                options.append((ev, f"ilp minimum memory: {res.status}" + (f", path {path}" if path else "")))
                if not prob.refine(ev):
                    break
    finally:
        prob.objective = objective
        prob.tie_break_seed = None
        prob.reset_intervals()
        prob.ilp_rows.clear()
    ev, how = min(options, key=lambda o: (o[0].sim.peak_bytes, o[0].cost_s))
    name = "ilp" if how.startswith("ilp") else "sqrt"
    return ev, SolverInfo(name=name, status=how, seconds=time.perf_counter() - start, calls=len(options))


def minimum_budget_bytes(gp_or_problem, *, time_limit_s: float = 60.0) -> int:
    """The smallest budget (bytes) the planner can plan for, for a profiled graph."""
    prob = gp_or_problem if isinstance(gp_or_problem, Problem) else build_problem(gp_or_problem, granularity=_granularity(gp_or_problem))
    return _budget_for(_lowest(prob, time_limit_s)[0].sim.peak_bytes, "cuda" if prob.granularity > 1 else "cpu")


def _make_plan(prob: Problem, ev: Evaluation, baseline: Evaluation, budget: int, solver: SolverInfo, model_info: dict) -> Plan:
    gp = prob.gp
    info = gp.nodes
    recomputed = set(ev.recomputed)
    saved = set(ev.saved)
    decisions = []
    for name in prob.fwd:
        if name not in recomputed and name not in saved:
            continue
        ni = info[name]
        if name in recomputed:
            decision = "recompute"
            reason = "view: free to rebuild" if prob.own_bytes.get(name, 0) == 0 else "recomputed from saved inputs"
        else:
            decision = "save"
            if name in prob.free_save:
                reason = "model output: held anyway"
            elif not ni.recomputable:
                reason = "random or effectful op: never recomputed"
            else:
                reason = "saved for backward"
        decisions.append(
            NodeDecision(
                name=name,
                op=ni.op,
                module=ni.module,
                bytes=prob.own_bytes.get(name, 0),
                flops=ni.flops,
                time_s=ni.time_s,
                decision=decision,
                reason=reason,
                inputs=tuple(prob.fwd_inputs[name]),
            )
        )
    total_flops = sum(n.flops for n in info.values() if n.phase in ("forward", "backward"))
    return Plan(
        model=dict(model_info),
        target=gp.target,
        time_source=gp.time_source,
        dropout=gp.joint.dropout,
        budget_bytes=int(budget),
        predicted_peak_bytes=int(ev.sim.peak_bytes),
        baseline_peak_bytes=int(baseline.sim.peak_bytes),
        static_bytes=int(ev.sim.static_bytes),
        recompute_flops=int(ev.flops),
        total_flops=int(total_flops),
        recompute_time_s=float(ev.cost_s),
        solver=solver,
        nodes=tuple(decisions),
        timeline=tuple(prob.timeline(ev.recompute)),
        baseline_timeline=tuple(prob.timeline(baseline.recompute)),
    )
