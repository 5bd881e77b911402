"""Optimal save/recompute decisions by integer linear programming (PuLP).

Variables: ``r[v]`` (recompute forward value v in backward) and ``s[v]`` (save it).
Constraints: backward's inputs are saved or recomputed; a recomputed value's
inputs are saved or recomputed; random and effectful ops are never recomputed;
memory at every step of the linear model in :mod:`planner.problem` stays within
the budget. Objective: least recompute time. Memory rows are added lazily: solve
with the rows most likely to bind, add the rows the solution violates, repeat.
HiGHS is used when ``highspy`` is installed, else PuLP's bundled CBC.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pulp

from .problem import Problem

__all__ = ["IlpResult", "solve_ilp", "solver_backend"]

#: Relative MIP gap at which a solve stops: recompute costs closer than this are
#: below the accuracy of the time estimates.
_GAP = 5e-3


@dataclass(frozen=True)
class IlpResult:
    #: Values to recompute, or None when no solution was found.
    recompute: frozenset[str] | None
    status: str
    seconds: float
    gap: float | None
    objective: float | None
    num_binaries: int
    num_rows: int
    #: Peak of the linear memory model for this solution.
    model_peak: float | None = None


def solver_backend(time_limit_s: float):
    """HiGHS when installed (reports its MIP gap), else CBC."""
    try:
        import highspy  # noqa: F401

        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=_GAP)
    except ImportError:
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=_GAP)


def _initial_rows(prob: Problem) -> list[int]:
    const = prob.row_const
    nf = len(prob.fwd)
    rows = []
    # Forward rows: saved sets only grow, so only strict suffix maxima can bind.
    best = -np.inf
    for k in range(nf - 1, -1, -1):
        if const[k] > best:
            rows.append(k)
            best = const[k]
    # Backward: the start of backward and the local maxima of the constant part.
    b = const[nf:]
    if len(b):
        rows.append(nf)
        for j in range(1, len(b) - 1):
            if b[j] >= b[j - 1] and b[j] > b[j + 1]:
                rows.append(nf + j)
    return sorted(set(rows))


def solve_ilp(
    prob: Problem,
    budget_bytes: float | None,
    *,
    time_limit_s: float = 60.0,
    minimize_memory: bool = False,
    max_rounds: int = 12,
) -> IlpResult:
    """Solve for the cheapest recompute set whose model peak is within ``budget_bytes``.

    With ``minimize_memory=True`` the budget is ignored and the model peak is
    minimised instead (recompute time breaks ties).
    """
    start = time.perf_counter()
    fwd = prob.fwd
    cand_idx = {n: i for i, n in enumerate(prob.cand)}
    lp = pulp.LpProblem("checkpoint", pulp.LpMinimize)
    r = {n: lp.add_variable(f"r{i}", cat="Binary") for i, n in enumerate(fwd) if n in prob.can_recompute}
    s = {n: lp.add_variable(f"s{i}", cat="Binary") for i, n in enumerate(prob.cand)}

    def saved(n):
        if n in s:
            return s[n]
        return 1 if n in prob.free_save else 0

    def rec(n):
        return r.get(n, 0)

    for n in sorted(prob.bwd_needs, key=fwd.index):
        lp += saved(n) + rec(n) >= 1, f"need_{n}"
    for n in fwd:
        if n not in r:
            continue
        for a in prob.fwd_inputs[n]:
            lp += r[n] <= saved(a) + rec(a), f"dep_{n}_{a}"
    for n in s:
        if n in r:
            lp += s[n] + r[n] <= 1, f"one_{n}"

    total_cost = sum(prob.cost.values()) or 1.0
    scale = 1.0 / total_cost
    cost_expr = pulp.lpSum(prob.cost[n] * scale * v for n, v in r.items() if prob.cost[n] > 0)
    mem_scale = 1.0 / max(float(prob.row_const.max()), 1.0)
    peak_var = None
    if minimize_memory:
        peak_var = lp.add_variable("peak", lowBound=0)
        lp += peak_var + 1e-3 * cost_expr
    else:
        lp += cost_expr
    limit = None if minimize_memory else budget_bytes * mem_scale

    rows = _initial_rows(prob)
    added: set[int] = set()
    status, result, gap, objective = "Not Solved", None, None, None
    rounds = 0
    model_peak = None
    while True:
        rounds += 1
        for k in rows:
            if k in added:
                continue
            added.add(k)
            coeffs = []
            rs, rr = prob.row_save[k], prob.row_recompute[k]
            for i in np.nonzero(rs)[0]:
                coeffs.append((s[prob.cand[i]], rs[i] * mem_scale))
            for i in np.nonzero(rr)[0]:
                n = prob.cand[i]
                if n in r:
                    coeffs.append((r[n], rr[i] * mem_scale))
            expr = pulp.LpAffineExpression(coeffs) + float(prob.row_const[k]) * mem_scale
            if minimize_memory:
                lp += expr <= peak_var, f"mem_{k}"
            else:
                lp += expr <= limit, f"mem_{k}"
        remaining = max(1.0, time_limit_s - (time.perf_counter() - start))
        solver = solver_backend(remaining)
        lp.solve(solver)
        status = pulp.LpStatus[lp.status]
        if status not in ("Optimal",) and not (status == "Not Solved" and _has_values(r, s)):
            if lp.sol_status not in (pulp.LpSolutionIntegerFeasible, pulp.LpSolutionOptimal):
                result = None
                break
        sv = np.array([round(s[n].value() or 0) for n in prob.cand], dtype=float)
        rv = np.array([round(rec(n).value() or 0) if n in r else 0 for n in prob.cand], dtype=float)
        vals = prob.row_const + prob.row_save @ sv + prob.row_recompute @ rv
        model_peak = float(vals.max())
        result = frozenset(n for n, v in r.items() if round(v.value() or 0) == 1)
        objective = pulp.value(lp.objective)
        gap = _gap(lp)
        bound = model_peak if minimize_memory else budget_bytes
        violated = [k for k in np.nonzero(vals > (peak_var.value() / mem_scale if minimize_memory else bound) * (1 + 1e-9) + 1)[0] if k not in added]
        if not violated or rounds >= max_rounds or time.perf_counter() - start > time_limit_s:
            if violated:
                status = f"{status} (memory rows incomplete)"
            break
        # add the worst violated rows first
        violated.sort(key=lambda k: -vals[k])
        rows = violated[: max(20, len(violated) // 4)]
    return IlpResult(
        recompute=result,
        status=status,
        seconds=time.perf_counter() - start,
        gap=gap,
        objective=objective,
        num_binaries=len(r) + len(s),
        num_rows=lp.numConstraints(),
        model_peak=model_peak,
    )


def _has_values(r, s) -> bool:
    return all(v.value() is not None for v in list(r.values())[:1] + list(s.values())[:1])


def _gap(lp) -> float | None:
    model = getattr(lp, "solverModel", None)
    try:
        info = model.getInfo()
        return float(info.mip_gap)
    except Exception:  # CBC through the command line reports no gap
        return None
