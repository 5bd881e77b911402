"""Optimal save/recompute decisions by integer linear programming (PuLP).

Variables: ``r[v]`` (recompute forward value v in backward) and ``s[v]`` (save it).
Constraints: backward's inputs are saved or recomputed; a recomputed value's
inputs are saved or recomputed; random and effectful ops are never recomputed;
memory at every step of the linear model in :mod:`planner.problem` stays within
the budget. Objective: least recompute time (or FLOPs, then time: ``Problem.objective``). On small graphs the memory rows
are dense and added lazily (solve with the rows most likely to bind, add the rows
the solution violates, repeat); on big ones each step's memory is a continuous
variable chained to the previous step's through the values whose liveness changes
there, which keeps the constraint matrix sparse.
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
    """HiGHS when installed (reports its MIP gap), else CBC. (No MIP starts: HiGHS
    1.16 returned a given start as "Optimal" under the FLOPs objective, and starts
    did not shorten solves here.)"""
    try:
        import highspy
    except ImportError:
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=_GAP)
    _swallow_banner(highspy)
    return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=_GAP)


_banner_swallowed = False


def _swallow_banner(highspy) -> None:
    """HiGHS prints a banner to the process's stdout (C level, so ``msg=False`` and
    Python redirection miss it) when the first ``Highs`` object of a process is made;
    make that one here with file descriptor 1 pointed at /dev/null, so that a
    program whose stdout carries results (JSON) gets nothing else."""
    global _banner_swallowed
    if _banner_swallowed:
        return
    _banner_swallowed = True
    import ctypes
    import os
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no file descriptor 1 (embedded interpreters)
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        highspy.Highs()
        ctypes.CDLL(None).fflush(None)  # the banner may sit in C's stdout buffer
    finally:
        os.dup2(saved, 1)
        os.close(saved)


#: Memory coefficients below this fraction of the largest step's bytes are dropped.
_MIN_COEF = 1e-6

#: Above this many nonzeros (memory rows x candidates) the memory of each step is
#: chained through differences (sparse); below it, dense rows are added lazily,
#: which HiGHS solved faster on graphs of a few hundred candidates.
_DENSE_LIMIT = 2_000_000


def _initial_rows(prob: Problem) -> list[int]:
    """The dense rows most likely to bind: strict suffix maxima of the forward
    constant part (saved sets only grow in forward), the start of backward, and the
    local maxima of backward's constant part."""
    const = prob.row_const
    nf = len(prob.fwd)
    rows = []
    best = -np.inf
    for k in range(nf - 1, -1, -1):
        if const[k] > best:
            rows.append(k)
            best = const[k]
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
    minimised instead (recompute time breaks ties). ``max_rounds`` bounds the rounds of lazily added dense rows; the rows
    added are kept in ``prob.ilp_rows`` for later solves.
    """
    t0 = time.perf_counter()
    fwd = prob.fwd
    lp = pulp.LpProblem("checkpoint", pulp.LpMinimize)
    r = {n: lp.add_variable(f"r{i}", cat="Binary") for i, n in enumerate(fwd) if n in prob.can_recompute}
    s = {n: lp.add_variable(f"s{i}", cat="Binary") for i, n in enumerate(prob.cand)}

    def saved(n):
        if n in s:
            return s[n]
        return 1 if n in prob.free_save else 0

    for n in sorted(prob.bwd_needs, key=fwd.index):
        lp += saved(n) + r.get(n, 0) >= 1, f"need_{n}"
    for n in fwd:
        if n not in r:
            continue
        for a in prob.fwd_inputs[n]:
            lp += r[n] <= saved(a) + r.get(a, 0), f"dep_{n}_{a}"
    for n in s:
        if n in r:
            lp += s[n] + r[n] <= 1, f"one_{n}"

    weight = prob.weights()
    cost_expr = pulp.lpSum(weight[n] * v for n, v in r.items() if weight[n] > 0)
    mem_scale = 1.0 / max(float(prob.row_const.max()), 1.0)
    min_bytes = _MIN_COEF / mem_scale
    peak_var = None
    if minimize_memory:
        peak_var = lp.add_variable("peak", lowBound=0)
        lp += peak_var + 1e-3 * cost_expr
    else:
        lp += cost_expr
    S, R, const = prob.row_save, prob.row_recompute, prob.row_const
    r_cols = np.array([n in r for n in prob.cand])

    def row_terms(save_row, rec_row):
        # Values below _MIN_COEF of the largest step (a few hundred bytes here) are
        # left out of the rows: the exact simulation checks every plan anyway, and
        # HiGHS 1.16's presolve looped forever, past its time limit, on a model with
        # 1e-8 coefficients.
        keep_s = np.abs(save_row) >= min_bytes
        keep_r = (np.abs(rec_row) >= min_bytes) & r_cols
        terms = [(s[prob.cand[i]], save_row[i] * mem_scale) for i in np.nonzero(keep_s)[0]]
        terms += [(r[prob.cand[i]], rec_row[i] * mem_scale) for i in np.nonzero(keep_r)[0]]
        return terms

    def limit(k):
        return None if minimize_memory else (budget_bytes - float(const[k])) * mem_scale

    chained = S.size > _DENSE_LIMIT
    mem: list = []
    if chained:
        # One continuous variable per step for its decision-dependent bytes, each
        # the previous step's plus the values whose liveness changes there: every
        # candidate enters a few rows only.
        dS = np.diff(S, axis=0, prepend=0.0)
        dR = np.diff(R, axis=0, prepend=0.0)
        for k in range(len(const)):
            m = lp.add_variable(f"m{k}", upBound=limit(k))
            terms = [(m, 1.0)] + ([(mem[-1], -1.0)] if k else [])
            terms += [(v, -c) for v, c in row_terms(dS[k], dR[k])]
            lp += pulp.LpAffineExpression(terms) == 0, f"mem_{k}"
            if minimize_memory:
                lp += m + float(const[k]) * mem_scale <= peak_var, f"peak_{k}"
            mem.append(m)

    rows = [] if chained else sorted(set(_initial_rows(prob)) | prob.ilp_rows)
    added: set[int] = set()
    status, result, gap, objective, model_peak = "Not Solved", None, None, None, None
    for rounds in range(1, max_rounds + 1):
        for k in rows:
            if k not in added:
                added.add(k)
                expr = pulp.LpAffineExpression(row_terms(S[k], R[k]))
                if minimize_memory:
                    lp += expr + float(const[k]) * mem_scale <= peak_var, f"mem_{k}"
                else:
                    lp += expr <= limit(k), f"mem_{k}"
        remaining = max(1.0, time_limit_s - (time.perf_counter() - t0))
        lp.solve(solver_backend(remaining))
        status = pulp.LpStatus[lp.status]
        if status != "Optimal" and lp.sol_status not in (pulp.LpSolutionIntegerFeasible, pulp.LpSolutionOptimal):
            result = None
            break
        sv = np.array([round(s[n].value() or 0) for n in prob.cand], dtype=float)
        rv = np.array([round(r[n].value() or 0) if n in r else 0 for n in prob.cand], dtype=float)
        vals = const + S @ sv + R @ rv
        model_peak = float(vals.max())
        result = frozenset(n for n, v in r.items() if round(v.value() or 0) == 1)
        objective = pulp.value(lp.objective)
        gap = _gap(lp)
        bound = peak_var.value() / mem_scale if minimize_memory else budget_bytes
        violated = [k for k in np.nonzero(vals > bound * (1 + 1e-9) + 1)[0] if k not in added]
        if chained or not violated or time.perf_counter() - t0 > time_limit_s:
            break
        if rounds == max_rounds:
            status = f"{status} (memory rows incomplete)"
            break
        violated.sort(key=lambda k: -vals[k])  # the worst violated rows first
        rows = violated[: max(20, len(violated) // 4)]
    prob.ilp_rows |= added
    return IlpResult(
        recompute=result,
        status=status,
        seconds=time.perf_counter() - t0,
        gap=gap,
        objective=objective,
        num_binaries=len(r) + len(s),
        num_rows=lp.numConstraints(),
        model_peak=model_peak,
    )


def _gap(lp) -> float | None:
    model = getattr(lp, "solverModel", None)
    try:
        info = model.getInfo()
        return float(info.mip_gap)
    except Exception:  # CBC through the command line reports no gap
        return None
