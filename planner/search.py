"""Searches over ILP solves, each solution checked by exact simulation.

:func:`search_ilp` finds the cheapest plan within a budget by re-solving the ILP
under corrected memory rows; :func:`lowest_plan` finds the lowest peak the
planner can reach (the minimum budget). Neither changes the :class:`Problem` it
is given: the refined memory models and the dense rows carried from solve to
solve are local to each search.
"""

from __future__ import annotations

import dataclasses
import time

from .evaluation import Evaluation
from .ilp import solve_ilp
from .memory_model import MemoryModel, refine
from .plan_type import SolverInfo
from .problem import Problem
from .sqrt import solve_sqrt

__all__ = ["search_ilp", "lowest_plan", "MAX_STALE", "LOWEST_PATHS"]

#: Solutions over the budget in a row that :func:`search_ilp` re-solves under
#: corrected rows before it tightens the ILP's internal budget instead.
MAX_STALE = 2

#: Minimum-memory ILP paths tried by :func:`lowest_plan`: the plain one; when its
#: lowest peak is within 5% of the best found (sqrt(L)'s included), one whose
#: tie-breaking weights are perturbed, then more for as long as each lowers the
#: best peak (at most this many). On GPT-2 the plain path's lowest is 20-100% above
#: sqrt(L)'s and no other path is tried. The linear memory model misjudges some
#: recomputed values' lifetimes, so where a path settles depends on near-ties; on
#: the benchmark ResNet the first perturbed path reached 90.1 MiB where the plain
#: one settled at 97.9.
LOWEST_PATHS = 5


def search_ilp(
    prob: Problem,
    budget: int,
    time_limit_s: float,
    *,
    max_calls: int = 16,
    start: Evaluation | None = None,
    memory: MemoryModel | None = None,
    solve=solve_ilp,
) -> tuple[Evaluation, SolverInfo] | None:
    """Solve the ILP, check each solution by exact simulation, and adjust.

    The ILP's memory rows (``memory``, default ``prob.memory``) use estimated live
    intervals for recomputed values. After each solve the estimates of the values
    the solution saves or recomputes are replaced by the exact intervals of its
    simulated schedule (:func:`planner.memory_model.refine`), and a solution over
    the budget is solved again under the corrected rows. Corrections can alternate
    between solutions (each shows the exact intervals of different values), so
    after :data:`MAX_STALE` corrected solutions in a row still over the budget, or
    when the rows were already exact, the ILP's internal budget is tightened by the
    overshoot; a fitting solution found under a tightened internal budget loosens
    it again by the slack. When even the first solve finds nothing although
    ``start`` (sqrt(L)'s plan) fits, the rows overestimate: the internal budget is
    loosened once by their error on ``start``. Returns the cheapest fitting
    solution, or None. ``solve``: the ILP, :func:`planner.ilp.solve_ilp` or one with
    its interface (:class:`planner.block_ilp.BlockIlp`). On the graphs as split
    (:meth:`Problem.unarranged`), which the ILP's rows describe.
    """
    t0 = time.perf_counter()
    prob = prob.unarranged()
    memory = memory if memory is not None else prob.memory
    rows: frozenset[int] = frozenset()
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
        res = solve(prob, internal, memory=memory, rows=rows, time_limit_s=remaining)
        rows = res.rows
        calls += 1
        if res.recompute is None:
            if best is None and start is not None and not relaxed:
                # The rows overestimate: even the known fitting start is over the
                # budget under them. Loosen the internal budget by their error there.
                relaxed = True
                error = prob.model_peak_of(start, memory) - start.sim.peak_bytes
                if error > 0:
                    internal += error
                    continue
            break  # nothing fits the (internal) budget under the current rows
        ev = prob.evaluate(res.recompute)
        refined = refine(memory, ev)
        changed, memory = refined is not memory, refined
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
        elif changed and not repeated and stale < MAX_STALE:
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


def lowest_plan(prob: Problem, time_limit_s: float, *, solve=solve_ilp) -> tuple[Evaluation, SolverInfo]:
    """The lowest-peak plan found by the ILP (minimising memory, several paths) and
    sqrt(L). The same whatever was solved before, and whatever the objective (the ILP
    breaks ties between equally low peaks by recompute time). ``solve``: as for
    :func:`search_ilp`. On the graphs as split (:meth:`Problem.unarranged`)."""
    start = time.perf_counter()
    prob = prob.unarranged()
    options: list[tuple[Evaluation, str]] = []
    sq = solve_sqrt(prob, None)
    if sq.evaluation is not None:
        options.append((sq.evaluation, f"sqrt minimum memory, {sq.segments} segments"))
    options.append((prob.evaluate(frozenset(prob.can_recompute)), "recompute everything"))
    by_time = dataclasses.replace(prob, objective="time")
    best_peak = None
    for path in range(LOWEST_PATHS):
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
        options += _minimum_memory_path(by_time, path, start + time_limit_s, solve)
    ev, how = min(options, key=lambda o: (o[0].sim.peak_bytes, o[0].cost_s))
    name = "ilp" if how.startswith("ilp") else "sqrt"
    return ev, SolverInfo(name=name, status=how, seconds=time.perf_counter() - start, calls=len(options))


def _minimum_memory_path(prob: Problem, path: int, deadline: float, solve) -> list[tuple[Evaluation, str]]:
    """The plans of one minimum-memory path: from the first interval estimates,
    solve, refine the intervals from the solution's exact schedule and solve again
    (up to 8 times) until the refinement changes nothing. Path 0 uses the plain
    weights, path ``k`` the tie-breaking seed ``k``."""
    memory, rows = prob.memory, frozenset()
    found = []
    for _ in range(8):
        remaining = deadline - time.perf_counter()
        if remaining <= 0.5:
            break
        res = solve(prob, None, memory=memory, rows=rows, tie_break_seed=None if path == 0 else path,
                        time_limit_s=remaining, minimize_memory=True)
        rows = res.rows
        if res.recompute is None:
            break
        ev = prob.evaluate(res.recompute)
        found.append((ev, f"ilp minimum memory: {res.status}" + (f", path {path}" if path else "")))
        refined = refine(memory, ev)
        if refined is memory:
            break
        memory = refined
    return found
