"""A mixed-integer program on HiGHS (``highspy``), built from numpy arrays and grown
in place: rows are added between solves.

The block ILP (:mod:`planner.block_ilp`) adds memory rows to one model between
solves; going through PuLP would rebuild it each time. HiGHS's branch and bound
is deterministic and its work is bounded here by a count of nodes; the
wall-clock limit is only a safety net, so a solve gives the same answer whatever
the machine's load. (The thread count is left to HiGHS: its scheduler is global
to the process, and PuLP's HiGHS runs start it first.)
"""

from __future__ import annotations

import numpy as np

__all__ = ["HighsModel", "swallow_banner", "MIP_GAP", "MIP_MAX_NODES"]

#: Relative MIP gap at which a solve stops.
MIP_GAP = 5e-3
#: Branch-and-bound nodes a MILP solve may explore: a work limit, the same on any machine.
MIP_MAX_NODES = 20_000


class HighsModel:
    """One HiGHS model: minimise ``cost @ x`` subject to ``lower <= A x <= upper`` and bounds."""

    def __init__(self, *, time_limit_s: float = 60.0, gap: float = MIP_GAP):
        import highspy

        swallow_banner(highspy)
        self._hs = highspy
        self.h = h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("mip_rel_gap", gap)
        h.setOptionValue("mip_max_nodes", MIP_MAX_NODES)
        h.setOptionValue("time_limit", float(time_limit_s))
        self.num_cols = 0
        self.num_rows = 0
        self.integer: list[int] = []

    def add_cols(self, cost, lower, upper, columns: list[tuple[np.ndarray, np.ndarray]], *, integer: bool) -> range:
        """Add columns with ``(row indices, values)`` each in the existing rows; their indices."""
        n = len(cost)
        starts, idx, val = _packed(columns)
        self.h.addCols(n, np.asarray(cost, float), np.asarray(lower, float), np.asarray(upper, float), len(idx),
                       starts, idx, val)
        new = range(self.num_cols, self.num_cols + n)
        self.num_cols += n
        if integer:
            self.integer.extend(new)
        return new

    def add_rows(self, lower, upper, rows: list[tuple[np.ndarray, np.ndarray]]) -> range:
        """Add rows with ``(column indices, values)`` each; their indices."""
        n = len(rows)
        inf = self._hs.kHighsInf
        lo = np.array([-inf if v is None else v for v in lower], dtype=float)
        hi = np.array([inf if v is None else v for v in upper], dtype=float)
        starts, idx, val = _packed(rows)
        self.h.addRows(n, lo, hi, len(idx), starts, idx, val)
        new = range(self.num_rows, self.num_rows + n)
        self.num_rows += n
        return new

    def set_bounds(self, cols, lower, upper) -> None:
        cols = np.asarray(cols, dtype=np.int32)
        self.h.changeColsBounds(len(cols), cols, np.asarray(lower, float), np.asarray(upper, float))

    def solve(self, *, integer: bool) -> tuple[str, bool]:
        """Solve as a MILP (``integer``) or as its LP relaxation; ``(status, found)``."""
        hs = self._hs
        if self.integer:
            kind = hs.HighsVarType.kInteger if integer else hs.HighsVarType.kContinuous
            cols = np.array(self.integer, dtype=np.int32)
            self.h.changeColsIntegrality(len(cols), cols, np.array([kind] * len(cols)))
        if self.h.run() == hs.HighsStatus.kError:
            raise RuntimeError(f"HiGHS refused the model ({self.num_rows} rows, {self.num_cols} columns): "
                               f"{self.h.modelStatusToString(self.h.getModelStatus())}; run with "
                               "h.setOptionValue('output_flag', True) on HighsModel.h to see why")
        status = self.h.getModelStatus()
        found = self.h.getInfo().primal_solution_status == int(hs.SolutionStatus.kSolutionStatusFeasible)
        return self.h.modelStatusToString(status), found

    def values(self) -> np.ndarray:
        return np.array(self.h.getSolution().col_value)

    def objective(self) -> float:
        return float(self.h.getInfo().objective_function_value)

    def gap(self) -> float:
        return float(self.h.getInfo().mip_gap)

    def bound(self) -> float:
        """The MILP's dual bound (the LP's objective after an LP solve)."""
        return float(self.h.getInfo().mip_dual_bound)


def _packed(vectors: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts = np.zeros(len(vectors), dtype=np.int32)
    total = 0
    for i, (idx, _) in enumerate(vectors):
        starts[i] = total
        total += len(idx)
    if not vectors or total == 0:
        return starts, np.zeros(0, dtype=np.int32), np.zeros(0)
    idx = np.concatenate([np.asarray(v[0], dtype=np.int32) for v in vectors])
    val = np.concatenate([np.asarray(v[1], dtype=float) for v in vectors])
    return starts, idx, val


_banner_swallowed = False


def swallow_banner(highspy) -> None:
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
