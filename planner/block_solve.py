"""Plans for deep models: the ILP solved block by block.

:class:`BlockIlp` has :func:`planner.ilp.solve_ilp`'s interface, so the searches
that check each solution by exact simulation (:func:`planner.search.search_ilp`,
:func:`planner.search.lowest_plan`) run on it unchanged. Each solve builds the
block master (:mod:`planner.block_master`) from the patterns known so far (at
first, each kind's trade-off between recomputation and saved bytes,
:func:`planner.block_patterns.initial_patterns`), generates the patterns its LP
relaxation asks for, then solves the MILP over them; memory rows a solution
violates are added and the loop runs again. Patterns found stay for the next
solve. Every limit is a count (pricing rounds, memory-row rounds, HiGHS's node
limit), so the answer does not depend on the machine's load.
"""

from __future__ import annotations

import time

import numpy as np

from .block_master import BlockMaster
from .block_polish import polish
from .block_patterns import KindLayout, PatternIlp, initial_patterns, kind_layout
from .blocks import BlockSet
from .ilp import IlpResult, initial_rows
from .memory_model import MemoryModel
from .problem import Problem

__all__ = ["BlockIlp", "block_layouts", "PRICING_ROUNDS"]

#: LP solves (each followed by pricing or by adding violated memory rows) per MILP.
PRICING_ROUNDS = 60
#: Passes of :func:`planner.block_polish.polish` over the copies after each MILP (0: none).
POLISH_SWEEPS = 2
#: Violated memory rows added at a time (the worst first).
_ROWS_PER_ROUND = 40


def block_layouts(prob: Problem, blocks: BlockSet, memory: MemoryModel | None = None) -> list[KindLayout]:
    """The layouts of ``blocks``' kinds that have at least two matching copies."""
    memory = memory if memory is not None else prob.memory
    out = []
    for group in blocks.kinds.values():
        lay = kind_layout(prob, memory, group)
        if lay is not None:
            out.append(lay)
    return out


class BlockIlp:
    """:func:`planner.ilp.solve_ilp` over block patterns (give it to the searches as ``solve``)."""

    def __init__(self, prob: Problem, layouts: list[KindLayout], *, time_limit_s: float = 60.0):
        self.layouts = layouts
        self.ilps = {lay.kind: PatternIlp(lay, time_limit_s=time_limit_s) for lay in layouts}
        weights = prob.weights()
        self.pools: dict = {}
        for lay in layouts:
            ref = lay.blocks[len(lay.blocks) // 2]
            w = np.array([weights[ref.forward[i]] for i in lay.recomputable])
            sizes = prob.memory.candidate_bytes[lay.columns[len(lay.blocks) // 2]]
            start = initial_patterns(self.ilps[lay.kind], w, sizes)
            for k in range(len(lay.blocks)):
                self.pools[(lay.kind, k)] = list(start)
        #: Solves, LP solves and MILP solves made so far.
        self.counts = {"solves": 0, "lp": 0, "milp": 0}

    @property
    def num_patterns(self) -> int:
        """Distinct patterns known, over all kinds."""
        return len({(kind, p) for (kind, _), ps in self.pools.items() for p in ps})

    def __call__(self, prob: Problem, budget_bytes: float | None, *, memory: MemoryModel | None = None,
                 rows: frozenset[int] = frozenset(), tie_break_seed: int | None = None, time_limit_s: float = 60.0,
                 minimize_memory: bool = False, max_rounds: int = 12) -> IlpResult:
        t0 = time.perf_counter()
        memory = memory if memory is not None else prob.memory
        budget = None if minimize_memory else float(budget_bytes)
        master = BlockMaster(prob, memory, self.layouts, self.pools, budget, prob.weights(tie_break_seed),
                             time_limit_s=time_limit_s)
        master.add_memory_rows(sorted(set(initial_rows(memory, len(prob.fwd))) | set(rows)))
        self.counts["solves"] += 1
        status, x, bound = "Not Solved", None, None
        for _ in range(max_rounds):
            lp = self._generate(master)
            if lp is None:
                status, x = "Infeasible", None
                break
            bound = lp
            status, x = self._milp(master)
            if x is None:
                break
            start = polish(master, x, self.ilps, sweeps=POLISH_SWEEPS) if POLISH_SWEEPS else None
            if start is not None:
                master.model.start(start)
                status, x = self._milp(master)
            violated = self._violated(master, x)
            if not violated:
                break
            master.add_memory_rows(violated)
            status = f"{status} (memory rows incomplete)"
        return self._result(master, status, x, bound, rows, t0)

    def _generate(self, master: BlockMaster) -> float | None:
        """Column generation on the LP relaxation until no pattern lowers it and no
        memory row is violated; its value, or None when even the LP exceeds the budget."""
        m = master.model
        if master.budget is not None:
            m.set_bounds([master.extra], [0.0], [1e30])
        for _ in range(PRICING_ROUNDS):
            status, found = m.solve(integer=False)
            self.counts["lp"] += 1
            if not found:
                raise RuntimeError(f"the block master's LP relaxation has no solution ({status})")
            x = m.values()
            violated = self._violated(master, x)
            if violated:
                master.add_memory_rows(violated)
                continue
            if master.price(m.duals(), self.ilps) == 0:
                break
        if master.budget is not None and x[master.extra] > 1e-7:
            return None
        return m.objective()

    def _milp(self, master: BlockMaster):
        m = master.model
        if master.budget is not None:
            m.set_bounds([master.extra], [0.0], [0.0])
        status, found = m.solve(integer=True)
        self.counts["milp"] += 1
        return status, (m.values() if found else None)

    @staticmethod
    def _violated(master: BlockMaster, x: np.ndarray) -> list[int]:
        vals = master.row_values(x)
        bound = master.budget if master.budget is not None else x[master.extra] / master.scale
        over = np.nonzero(vals > bound * (1 + 1e-9) + 1)[0]
        added = set(master.mem_rows)
        over = [int(k) for k in over if int(k) not in added]
        over.sort(key=lambda k: -vals[k])
        return over[:_ROWS_PER_ROUND]

    def _result(self, master: BlockMaster, status: str, x, bound, rows, t0: float) -> IlpResult:
        m = master.model
        found = x is not None
        return IlpResult(
            recompute=master.recompute_set(x) if found else None,
            status=status,
            seconds=time.perf_counter() - t0,
            gap=m.gap() if found else None,
            objective=m.objective() if found else None,
            num_rows=m.num_rows,
            model_peak=float(master.row_values(x).max()) if found else None,
            rows=frozenset(master.mem_rows) | rows,
            bound=bound,
        )
