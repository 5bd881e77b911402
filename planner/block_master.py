"""The block master: the step's ILP with each repeated block choosing one pattern.

Columns: one binary per (block copy, pattern) (:mod:`planner.block_patterns`), and
the node ILP's binaries (:mod:`planner.ilp`) for the values outside repeated blocks.
Rows: each copy picks one pattern; backward's inputs outside blocks are saved or
recomputed; a recomputed value's inputs are saved or recomputed where that
crosses a block's edge (the rules inside a block hold in every pattern); and the
memory rows of the linear memory model (:mod:`planner.memory_model`), added
lazily: the rows most likely to bind first, then those a solution violates.

Patterns are generated as the LP relaxation asks for them (column generation):
after each LP solve, each copy's best pattern under the LP's duals is found by
:meth:`PatternIlp.best`, and added when it would lower the LP's cost. When no
pattern would, the LP's value bounds the ILP's from below, and the MILP over the
patterns found is solved. In budget mode a slack column keeps the LP feasible
(at a high price) so that its duals lead to patterns that fit.
"""

from __future__ import annotations

import numpy as np

from .block_patterns import KindLayout, Pattern, PatternIlp
from .highs import HighsModel
from .memory_model import MemoryModel
from .problem import Problem

__all__ = ["BlockMaster", "SLACK_COST"]

#: Objective price of one unit (the largest step's bytes) of memory over the budget
#: in the LP relaxation; recompute costs are normalised to 1 for the whole step.
SLACK_COST = 1e3
#: Memory coefficients below this fraction of the largest step's bytes are dropped.
_MIN_COEF = 1e-6


class BlockMaster:
    """One master problem: a budget (or, with ``budget_bytes=None``, the least peak)."""

    def __init__(self, prob: Problem, memory: MemoryModel, layouts: list[KindLayout], pools: dict,
                 budget_bytes: float | None, weights: dict[str, float], *, time_limit_s: float = 60.0):
        self.prob, self.memory, self.layouts, self.budget = prob, memory, layouts, budget_bytes
        self.pools = pools  # per (kind, copy): patterns known, shared with later masters
        # least peak: recompute cost only breaks ties between equal peaks
        factor = 1.0 if budget_bytes is not None else 1e-3
        self.weights = {n: w * factor for n, w in weights.items()}
        self.scale = 1.0 / max(float(memory.const.max()), 1.0)
        self.model = HighsModel(time_limit_s=time_limit_s)
        self.col = {n: i for i, n in enumerate(memory.candidates)}
        self.owner = {n: (li, k, i) for li, lay in enumerate(layouts) for k, b in enumerate(lay.blocks)
                      for i, n in enumerate(b.forward)}
        self.pattern_cols: list[tuple[int, int, Pattern]] = []  # (layout, copy, pattern) per column
        self.column_of: dict[tuple[int, int, Pattern], int] = {}
        self.mem_rows: list[int] = []  # memory-model row of each memory row added
        self._structure()
        self._node_columns()
        self._extra_column()
        for li, lay in enumerate(layouts):
            for k in range(len(lay.blocks)):
                self.add_patterns(li, k, pools[(lay.kind, k)])

    # -- rows and columns -----------------------------------------------------
    def _structure(self) -> None:
        """Pick rows, and the need/dependency/one rows outside blocks, as terms over
        node quantities ``(node, "s"|"r")``."""
        prob, owner = self.prob, self.owner
        rows: list[tuple[dict, float | None, float | None]] = []
        for li, lay in enumerate(self.layouts):
            for k in range(len(lay.blocks)):
                rows.append(({("pick", li, k): 1.0}, 1.0, 1.0))
        for n in prob.fwd:
            inside = owner.get(n)
            if inside is None and n in prob.bwd_needs and n not in prob.free_save:
                rows.append(({(n, "s"): 1.0, (n, "r"): 1.0}, 1.0, None))
            if n not in prob.can_recompute:
                continue
            for a in prob.fwd_inputs[n]:
                if inside is not None and owner.get(a, (None, None))[:2] == inside[:2]:
                    continue  # within one block: every pattern keeps it
                if a in prob.free_save:
                    continue
                rows.append(({(n, "r"): 1.0, (a, "s"): -1.0, (a, "r"): -1.0}, None, 0.0))
            if inside is None and n in self.col:
                rows.append(({(n, "s"): 1.0, (n, "r"): 1.0}, None, 1.0))
        self.terms_of: dict = {}  # node quantity -> [(row, coefficient)]
        for j, (terms, _, _) in enumerate(rows):
            for q, c in terms.items():
                self.terms_of.setdefault(q, []).append((j, c))
        self.row_lower = [lo for _, lo, _ in rows]
        self.row_upper = [hi for _, _, hi in rows]
        self.model.add_rows(self.row_lower, self.row_upper, [(np.zeros(0), np.zeros(0))] * len(rows))
        self.num_struct = len(rows)
        self.pick_row = {q[1:]: j for q, lst in self.terms_of.items() if q[0] == "pick" for j, _ in lst}

    def _node_columns(self) -> None:
        """The binaries of values outside blocks that can be recomputed or saved."""
        prob, cols, costs, self.node_cols = self.prob, [], [], []
        for n in prob.fwd:
            if n in self.owner:
                continue
            for which in ("r", "s"):
                if (which == "r" and n in prob.can_recompute) or (which == "s" and n in self.col):
                    self.node_cols.append((n, which))
                    costs.append(self.weights[n] if which == "r" else 0.0)
                    cols.append(self._entries(self.terms_of.get((n, which), [])))
        self.model.add_cols(costs, np.zeros(len(costs)), np.ones(len(costs)), cols, integer=True)

    def _extra_column(self) -> None:
        """Budget mode: the slack (memory over the budget); else the peak."""
        m = self.model
        self.extra = m.num_cols
        cost = SLACK_COST if self.budget is not None else 1.0
        m.add_cols([cost], [0.0], [1e30], [(np.zeros(0), np.zeros(0))], integer=False)

    @staticmethod
    def _entries(pairs) -> tuple[np.ndarray, np.ndarray]:
        acc: dict[int, float] = {}
        for j, c in pairs:
            acc[j] = acc.get(j, 0.0) + c
        return np.array(list(acc), dtype=np.int32), np.array(list(acc.values()), dtype=float)

    def pattern_cost(self, li: int, k: int, p: Pattern) -> float:
        fwd = self.layouts[li].blocks[k].forward
        return sum(self.weights[fwd[i]] for i in p.recompute)

    def add_patterns(self, li: int, k: int, patterns) -> int:
        """Columns for copy ``k`` of layout ``li`` taking each of ``patterns`` not yet
        in the model; returns how many were added."""
        lay, new = self.layouts[li], []
        for p in patterns:
            key = (li, k, p)
            if key not in self.column_of:
                new.append(key)
        if not new:
            return 0
        cols = [self.column_entries(li, k, p) for _, _, p in new]
        costs = [self.pattern_cost(li, k, p) for _, _, p in new]
        first = self.model.add_cols(costs, np.zeros(len(new)), np.ones(len(new)), cols, integer=True).start
        for j, key in enumerate(new):
            self.column_of[key] = first + j
            self.pattern_cols.append(key)
            if key[2] not in self.pools[(lay.kind, k)]:
                self.pools[(lay.kind, k)].append(key[2])
        return len(new)

    def column_entries(self, li: int, k: int, p: Pattern) -> tuple[np.ndarray, np.ndarray]:
        """The rows and values of the column of copy ``k`` of layout ``li`` taking ``p``."""
        block = self.layouts[li].blocks[k]
        pairs = [(self.pick_row[(li, k)], 1.0)]
        for which, positions in (("s", p.save), ("r", p.recompute)):
            for i in positions:
                pairs += self.terms_of.get((block.forward[i], which), [])
        idx, val = self._entries(pairs)
        mem_idx, mem_val = self._memory_entries(li, k, [p])
        return np.concatenate([idx, mem_idx[0]]), np.concatenate([val, mem_val[0]])

    def chosen(self, x: np.ndarray) -> dict[tuple[int, int], Pattern]:
        """The pattern each copy takes in the 0/1 solution ``x``."""
        return {(li, k): p for (li, k, p), j in self.column_of.items() if x[j] > 0.5}

    def _pattern_matrices(self, li: int, patterns) -> tuple[np.ndarray, np.ndarray]:
        """Candidates x patterns: 1 where a pattern saves (first) or recomputes (second) a candidate position."""
        lay = self.layouts[li]
        at = {i: c for c, i in enumerate(lay.candidates)}
        ps = np.zeros((len(lay.candidates), len(patterns)))
        pr = np.zeros((len(lay.candidates), len(patterns)))
        for j, p in enumerate(patterns):
            for i in p.save:
                ps[at[i], j] = 1.0
            for i in p.recompute:
                if i in at:
                    pr[at[i], j] = 1.0
        return ps, pr

    def _memory_entries(self, li: int, k: int, patterns) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per pattern, its entries in the memory rows added so far."""
        rows = np.array(self.mem_rows, dtype=int)
        if not len(rows):
            return [np.zeros(0, dtype=np.int32)] * len(patterns), [np.zeros(0)] * len(patterns)
        cols = self.layouts[li].columns[k]
        ps, pr = self._pattern_matrices(li, patterns)
        coef = (self.memory.save[np.ix_(rows, cols)] @ ps + self.memory.recompute[np.ix_(rows, cols)] @ pr) * self.scale
        idx, val = [], []
        for j in range(len(patterns)):
            keep = np.nonzero(np.abs(coef[:, j]) >= _MIN_COEF)[0]
            idx.append((self.num_struct + keep).astype(np.int32))
            val.append(coef[keep, j])
        return idx, val

    def add_memory_rows(self, rows) -> None:
        """The memory model's rows ``rows`` (those not yet added), over every column."""
        rows = [int(r) for r in rows if int(r) not in set(self.mem_rows)]
        if not rows:
            return
        m, mem, scale = self.memory, self.memory, self.scale
        r_idx = np.array(rows, dtype=int)
        blocks: list[tuple[np.ndarray, np.ndarray]] = []
        # values outside blocks
        node_idx, node_coef = [], []
        for c, (n, which) in enumerate(self.node_cols):
            if n in self.col:
                node_idx.append(c)
                node_coef.append((mem.save if which == "s" else mem.recompute)[r_idx, self.col[n]] * scale)
        node_coef = np.array(node_coef).reshape(len(node_idx), len(rows))
        # pattern columns, by copy
        by_copy: dict[tuple[int, int], list[int]] = {}
        for j, (li, k, _) in enumerate(self.pattern_cols):
            by_copy.setdefault((li, k), []).append(j)
        pat_idx, pat_coef = [], []
        for (li, k), js in by_copy.items():
            ps, pr = self._pattern_matrices(li, [self.pattern_cols[j][2] for j in js])
            cols = self.layouts[li].columns[k]
            coef = (mem.save[np.ix_(r_idx, cols)] @ ps + mem.recompute[np.ix_(r_idx, cols)] @ pr) * scale
            pat_idx += [self.column_of[self.pattern_cols[j]] for j in js]
            pat_coef.append(coef.T)
        all_idx = np.array(node_idx + pat_idx + [self.extra], dtype=np.int32)
        extra = -np.ones((1, len(rows)))
        all_coef = np.concatenate([node_coef] + pat_coef + [extra], axis=0)  # columns x rows
        for t in range(len(rows)):
            keep = np.abs(all_coef[:, t]) >= _MIN_COEF
            blocks.append((all_idx[keep], all_coef[keep, t]))
        const = m.const[r_idx] * scale
        upper = (self.budget * scale - const) if self.budget is not None else -const
        self.model.add_rows([None] * len(rows), list(upper), blocks)
        self.row_lower += [None] * len(rows)
        self.row_upper += list(upper)
        self.mem_rows += rows

    # -- reading a solution ----------------------------------------------------
    def decisions(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Saved and recomputed amount (0..1) per memory-model candidate for column values ``x``."""
        m = self.memory
        sv, rv = np.zeros(len(m.candidates)), np.zeros(len(m.candidates))
        for c, (n, which) in enumerate(self.node_cols):
            if n in self.col:
                (sv if which == "s" else rv)[self.col[n]] += x[c]
        for key, j in self.column_of.items():
            if x[j] <= 1e-9:
                continue
            li, k, p = key
            lay = self.layouts[li]
            cols = lay.columns[k]
            at = {i: c for c, i in enumerate(lay.candidates)}
            for i in p.save:
                sv[cols[at[i]]] += x[j]
            for i in p.recompute:
                if i in at:
                    rv[cols[at[i]]] += x[j]
        return sv, rv

    def row_values(self, x: np.ndarray) -> np.ndarray:
        """The memory model's bytes per row for column values ``x``."""
        sv, rv = self.decisions(x)
        return self.memory.const + self.memory.save @ sv + self.memory.recompute @ rv

    def recompute_set(self, x: np.ndarray) -> frozenset[str]:
        out = {n for c, (n, which) in enumerate(self.node_cols) if which == "r" and x[c] > 0.5}
        for (li, k, p), j in self.column_of.items():
            if x[j] > 0.5:
                fwd = self.layouts[li].blocks[k].forward
                out.update(fwd[i] for i in p.recompute)
        return frozenset(out)

    # -- pricing ----------------------------------------------------------------
    def price(self, duals: np.ndarray, ilps: dict[str, PatternIlp], tol: float = 1e-7) -> int:
        """Find every copy's best pattern under ``duals``; those with a negative reduced
        cost become columns of every copy of their kind. Returns how many columns were added."""
        mem, scale = self.memory, self.scale
        y_mem = duals[self.num_struct:self.num_struct + len(self.mem_rows)]
        rows = np.array(self.mem_rows, dtype=int)
        v_save = (y_mem @ mem.save[rows]) * scale if len(rows) else np.zeros(len(mem.candidates))
        v_rec = (y_mem @ mem.recompute[rows]) * scale if len(rows) else np.zeros(len(mem.candidates))
        added = 0
        for li, lay in enumerate(self.layouts):
            at = {i: c for c, i in enumerate(lay.candidates)}
            found: set[Pattern] = set()
            for k, block in enumerate(lay.blocks):
                cols = lay.columns[k]
                r_cost = np.array([self.weights[block.forward[i]] - self._dual_terms(duals, block.forward[i], "r")
                                   - (v_rec[cols[at[i]]] if i in at else 0.0) for i in lay.recomputable])
                s_cost = np.array([-self._dual_terms(duals, block.forward[i], "s") - v_save[cols[at[i]]]
                                   for i in lay.candidates])
                pattern, value = ilps[lay.kind].best(r_cost, s_cost)
                if value - duals[self.pick_row[(li, k)]] < -tol * (1.0 + abs(value)):
                    found.add(pattern)
            new = sorted(found, key=_order)
            for k in range(len(lay.blocks)):
                added += self.add_patterns(li, k, new)
        return added

    def _dual_terms(self, duals: np.ndarray, n: str, which: str) -> float:
        return sum(duals[j] * c for j, c in self.terms_of.get((n, which), ()))


def _order(p: Pattern) -> tuple:
    return (sorted(p.recompute), sorted(p.save))
