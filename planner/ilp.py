"""Optimal save/recompute decisions by integer linear programming (PuLP).

Variables: ``r[v]`` (recompute forward value v in backward) and ``s[v]`` (save it).
Constraints: backward's inputs are saved or recomputed; a recomputed value's
inputs are saved or recomputed; random and effectful ops are never recomputed;
memory at every step of the linear model (:mod:`planner.memory_model`) stays within
the budget. Objective: least recompute time (or FLOPs, then time: ``Problem.objective``). On small graphs the memory rows
are dense and added lazily (solve with the rows most likely to bind, add the rows
the solution violates, repeat); on big ones each step's memory is a continuous
variable chained to the previous step's through the values whose liveness changes
there, which keeps the constraint matrix sparse.
HiGHS is used when ``highspy`` is installed, else CBC (``COIN_CMD``) when a ``cbc``
program is installed (``pip install pulp[cbc]``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pulp

from .highs import swallow_banner
from .memory_model import MemoryModel
from .problem import Problem

__all__ = ["IlpResult", "NoMilpSolver", "solve_ilp", "initial_rows", "solver_backend", "backend_name"]

#: Relative MIP gap at which a solve stops: recompute costs closer than this are
#: below the accuracy of the time estimates.
_GAP = 5e-3


@dataclass(frozen=True, kw_only=True, slots=True)
class IlpResult:
    """One ILP solve (several rounds when dense memory rows are added lazily)."""

    #: Values to recompute, or None when no solution was found.
    recompute: frozenset[str] | None
    #: PuLP's status of the last round, e.g. ``"Optimal"``.
    status: str
    #: Wall-clock seconds of the whole solve.
    seconds: float
    #: Relative MIP gap and objective value of the last solution (None when the solver reports none).
    gap: float | None
    objective: float | None
    #: Constraints in the model at the end.
    num_rows: int
    #: Peak of the linear memory model for this solution.
    model_peak: float | None = None
    #: Dense memory rows this solve used (those given included): give them to
    #: the next solve of the same problem.
    rows: frozenset[int] = frozenset()
    #: A lower bound on the objective (the LP relaxation's value) when the solver gives one.
    bound: float | None = None


class NoMilpSolver(RuntimeError):
    """Neither HiGHS (``highspy``) nor a CBC program is installed."""


def solver_backend(time_limit_s: float):
    """HiGHS when installed (reports its MIP gap), else CBC. (No MIP starts: HiGHS
    1.16 returned a given start as "Optimal" under the FLOPs objective, and starts
    did not shorten solves here.)"""
    try:
        import highspy
    except ImportError:
        cbc = pulp.COIN_CMD(msg=False, timeLimit=time_limit_s, gapRel=_GAP)
        if not cbc.available():
            raise NoMilpSolver(
                "the ILP solver needs HiGHS or CBC: pip install highspy (a dependency of the planner), "
                "or pip install 'checkpoint-planner[cbc]' for CBC"
            ) from None
        return cbc
    swallow_banner(highspy)
    return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=_GAP)


def backend_name() -> str:
    """``"highs"`` when ``highspy`` is installed (the ILPs run on HiGHS), else ``"cbc"``."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        return "cbc"
    return "highs"


#: Memory coefficients below this fraction of the largest step's bytes are dropped.
_MIN_COEF = 1e-6

#: Above this many nonzeros (memory rows x candidates) the memory of each step is
#: chained through differences (sparse); below it, dense rows are added lazily,
#: which HiGHS solved faster on graphs of a few hundred candidates.
_DENSE_LIMIT = 2_000_000


def initial_rows(memory: MemoryModel, nf: int) -> list[int]:
    """The dense rows most likely to bind: strict suffix maxima of the forward
    constant part (saved sets only grow in forward), the start of backward, the
    local maxima of backward's constant part, and the training loop's rows (``nf``:
    the number of forward rows)."""
    const = memory.const
    rows = []
    best = -np.inf
    for k in range(nf - 1, -1, -1):
        if const[k] > best:
            rows.append(k)
            best = const[k]
    nb = len(memory.backward)
    rows += range(nf + nb, len(const))  # the training loop's rows (planner.training_loop)
    b = const[nf : nf + nb]
    if len(b):
        rows.append(nf)
        for j in range(1, len(b) - 1):
            if b[j] >= b[j - 1] and b[j] > b[j + 1]:
                rows.append(nf + j)
    return sorted(set(rows))


class _Formulation:
    """The PuLP model of one solve: decision variables, the constraints between
    them, the objective, and the memory rows added so far."""

    def __init__(self, prob: Problem, memory: MemoryModel, budget_bytes: float | None, *,
                 minimize_memory: bool, tie_break_seed: int | None):
        fwd = prob.fwd
        self.memory, self.budget, self.minimize = memory, budget_bytes, minimize_memory
        self.lp = lp = pulp.LpProblem("checkpoint", pulp.LpMinimize)
        self.r = r = {n: lp.add_variable(f"r{i}", cat="Binary") for i, n in enumerate(fwd) if n in prob.can_recompute}
        self.s = s = {n: lp.add_variable(f"s{i}", cat="Binary") for i, n in enumerate(memory.candidates)}

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
        weight = prob.weights(tie_break_seed)
        cost_expr = pulp.lpSum(weight[n] * v for n, v in r.items() if weight[n] > 0)
        self.scale = 1.0 / max(float(memory.const.max()), 1.0)
        self.min_bytes = _MIN_COEF / self.scale
        self.peak_var = None
        if minimize_memory:
            self.peak_var = lp.add_variable("peak", lowBound=0)
            lp += self.peak_var + 1e-3 * cost_expr
        else:
            lp += cost_expr
        self.r_cols = np.array([n in r for n in memory.candidates])

    def row_terms(self, save_row, rec_row) -> list:
        # Values below _MIN_COEF of the largest step (a few hundred bytes here) are
        # left out of the rows: the exact simulation checks every plan anyway, and
        # HiGHS 1.16's presolve looped forever, past its time limit, on a model with
        # 1e-8 coefficients.
        cand = self.memory.candidates
        keep_s = np.abs(save_row) >= self.min_bytes
        keep_r = (np.abs(rec_row) >= self.min_bytes) & self.r_cols
        terms = [(self.s[cand[i]], save_row[i] * self.scale) for i in np.nonzero(keep_s)[0]]
        terms += [(self.r[cand[i]], rec_row[i] * self.scale) for i in np.nonzero(keep_r)[0]]
        return terms

    def limit(self, k: int) -> float | None:
        return None if self.minimize else (self.budget - float(self.memory.const[k])) * self.scale

    def add_chained_rows(self) -> None:
        """One continuous variable per step for its decision-dependent bytes, each
        the previous step's plus the values whose liveness changes there: every
        candidate enters a few rows only."""
        m = self.memory
        lp = self.lp
        d_save = np.diff(m.save, axis=0, prepend=0.0)
        d_rec = np.diff(m.recompute, axis=0, prepend=0.0)
        mem: list = []
        for k in range(len(m.const)):
            v = lp.add_variable(f"m{k}", upBound=self.limit(k))
            terms = [(v, 1.0)] + ([(mem[-1], -1.0)] if k else [])
            terms += [(x, -c) for x, c in self.row_terms(d_save[k], d_rec[k])]
            lp += pulp.LpAffineExpression(terms) == 0, f"mem_{k}"
            if self.minimize:
                lp += v + float(m.const[k]) * self.scale <= self.peak_var, f"peak_{k}"
            mem.append(v)

    def add_dense_row(self, k: int) -> None:
        m = self.memory
        expr = pulp.LpAffineExpression(self.row_terms(m.save[k], m.recompute[k]))
        if self.minimize:
            self.lp += expr + float(m.const[k]) * self.scale <= self.peak_var, f"mem_{k}"
        else:
            self.lp += expr <= self.limit(k), f"mem_{k}"

    def solve(self, time_limit_s: float) -> tuple[str, bool]:
        """Solve; returns PuLP's status and whether a solution was found."""
        backend = solver_backend(time_limit_s)
        self.lp.solve(backend)
        status = pulp.LpStatus[self.lp.status]
        found = status == "Optimal" or self.lp.sol_status in (pulp.LpSolutionIntegerFeasible, pulp.LpSolutionOptimal)
        self.gap = _gap(self.lp, backend) if found else None
        return status, found

    def rows_of_solution(self) -> np.ndarray:
        """The memory model's bytes per row for the current solution."""
        m = self.memory
        sv = np.array([round(self.s[n].value() or 0) for n in m.candidates], dtype=float)
        rv = np.array([round(self.r[n].value() or 0) if n in self.r else 0 for n in m.candidates], dtype=float)
        return m.const + m.save @ sv + m.recompute @ rv

    def recompute_set(self) -> frozenset[str]:
        return frozenset(n for n, v in self.r.items() if round(v.value() or 0) == 1)

    def bound(self) -> float:
        """The peak the current solution must stay under: the budget, or the minimised peak."""
        return self.peak_var.value() / self.scale if self.minimize else self.budget


def solve_ilp(
    prob: Problem,
    budget_bytes: float | None,
    *,
    memory: MemoryModel | None = None,
    rows: frozenset[int] = frozenset(),
    tie_break_seed: int | None = None,
    time_limit_s: float = 60.0,
    minimize_memory: bool = False,
    max_rounds: int = 12,
) -> IlpResult:
    """Solve for the cheapest recompute set whose model peak is within ``budget_bytes``.

    ``memory``: the memory model (default ``prob.memory``, its first estimates).
    With ``minimize_memory=True`` the budget is ignored and the model peak is
    minimised instead (recompute time breaks ties). ``max_rounds`` bounds the
    rounds of lazily added dense rows; ``rows`` are dense rows to start with (those
    an earlier solve returned in :attr:`IlpResult.rows`). ``tie_break_seed``: see
    :meth:`Problem.weights`.
    """
    t0 = time.perf_counter()
    memory = memory if memory is not None else prob.memory
    f = _Formulation(prob, memory, budget_bytes, minimize_memory=minimize_memory, tie_break_seed=tie_break_seed)
    chained = memory.save.size > _DENSE_LIMIT
    if chained:
        f.add_chained_rows()
    pending = [] if chained else sorted(set(initial_rows(memory, len(prob.fwd))) | rows)
    added: set[int] = set()
    status, result, gap, objective, model_peak = "Not Solved", None, None, None, None
    for rounds in range(1, max_rounds + 1):
        for k in pending:
            if k not in added:
                added.add(k)
                f.add_dense_row(k)
        status, found = f.solve(max(1.0, time_limit_s - (time.perf_counter() - t0)))
        if not found:
            result = None
            break
        vals = f.rows_of_solution()
        model_peak = float(vals.max())
        result = f.recompute_set()
        objective = pulp.value(f.lp.objective)
        gap = f.gap
        violated = [k for k in np.nonzero(vals > f.bound() * (1 + 1e-9) + 1)[0] if k not in added]
        if chained or not violated or time.perf_counter() - t0 > time_limit_s:
            break
        if rounds == max_rounds:
            status = f"{status} (memory rows incomplete)"
            break
        violated.sort(key=lambda k: -vals[k])  # the worst violated rows first
        pending = violated[: max(20, len(violated) // 4)]
    return IlpResult(
        recompute=result,
        status=status,
        seconds=time.perf_counter() - t0,
        gap=gap,
        objective=objective,
        num_rows=f.lp.numConstraints(),
        model_peak=model_peak,
        rows=frozenset(added) | rows,
    )


def _gap(lp: pulp.LpProblem, backend) -> float | None:
    """The relative MIP gap HiGHS reports (CBC through its command line reports none)."""
    if not isinstance(backend, pulp.HiGHS):
        return None
    return float(lp.solverModel.getInfo().mip_gap)
