"""The ILP with the copies of each repeated block sharing their decisions.

Every copy of a kind of block (:mod:`planner.blocks`) in one *group* of
neighbouring copies takes the same decisions position by position: the
variables of a 24-layer transformer are those of a few layers, whatever its
depth. The copies are split into :data:`GROUPS` contiguous groups, so that the
copies near the start of backward (which sees every saved value) and the others
can keep different amounts. Values outside repeated blocks (embeddings, the
head, the loss) keep their own variables. The rules and the memory rows are
the flat ILP's (:mod:`planner.ilp`), with each memory row's coefficients summed
over the copies that share a variable; the memory rows are added lazily (those
most likely to bind first, then those a solution violates).

:class:`BlockIlp` has :func:`planner.ilp.solve_ilp`'s interface, so the searches
that check each solution by exact simulation and refine the memory model
(:func:`planner.search.search_ilp`, :func:`planner.search.lowest_plan`) run on
it unchanged. HiGHS solves it single-threaded under a branch-and-bound node
limit (:mod:`planner.highs`): the answer does not depend on the machine's load.
"""

from __future__ import annotations

import time

import numpy as np

from .block_layout import KindLayout, kind_layout
from .blocks import BlockSet, find_blocks
from .highs import HighsModel
from .ilp import IlpResult, backend_name, initial_rows
from .memory_model import MemoryModel
from .problem import Problem

__all__ = ["BlockIlp", "block_layouts", "block_solver", "peak_lower_bound", "group_of", "GROUPS", "TAIL", "AUTO_MIN_COPIES", "AUTO_COVERAGE"]

#: Contiguous groups of copies per kind that share their decisions, besides the last ones.
GROUPS = 2
#: The last copies of a kind, each with its own decisions.
TAIL = 1
#: Memory coefficients below this fraction of the largest step's bytes are dropped.
_MIN_COEF = 1e-6
#: Violated memory rows added per round (the worst first).
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


def group_of(k: int, copies: int, groups: int, tail: int) -> int:
    """The group of copy ``k`` of ``copies``: each of the last ``tail`` copies alone
    (the first backward reaches, while every other copy's saved values are live),
    the others in ``groups`` contiguous groups."""
    body = copies - tail
    if k >= body:
        return groups + (k - body)
    return k * groups // max(1, body)


def _variables(prob: Problem, layouts: list[KindLayout], groups: int, tail: int) -> tuple[dict, list]:
    """``(var, names)``: per forward node and ``"r"``/``"s"``, the index of the
    variable it uses (shared by the copies of a group), and each variable's name."""
    cand = set(prob.memory.candidates)
    var: dict[tuple[str, str], int] = {}
    names: list[str] = []
    shared: dict[tuple, int] = {}
    where: dict[str, tuple[int, int, int]] = {}
    for li, lay in enumerate(layouts):
        n = len(lay.blocks)
        t = min(tail, n - 1)
        for k, block in enumerate(lay.blocks):
            g = group_of(k, n, min(groups, n - t), t)
            for i, node in enumerate(block.forward):
                where[node] = (li, g, i)
    for node in prob.fwd:
        for which in ("r", "s"):
            if (which == "r" and node not in prob.can_recompute) or (which == "s" and node not in cand):
                continue
            key = (*where[node], which) if node in where else (node, which)
            if key not in shared:
                shared[key] = len(names)
                names.append(f"{which}:{node}")
            var[(node, which)] = shared[key]
    return var, names


class BlockIlp:
    """:func:`planner.ilp.solve_ilp` with the copies of repeated blocks sharing
    decisions (give it to the searches as ``solve``)."""

    def __init__(self, prob: Problem, layouts: list[KindLayout], *, groups: int = GROUPS, tail: int = TAIL):
        self.layouts = layouts
        self.var, self.names = _variables(prob, layouts, groups, tail)
        self.rules = self._rules(prob)
        # per candidate: the variable of its save / recompute (-1: none)
        cand = prob.memory.candidates
        self.save_var = np.array([self.var[(n, "s")] for n in cand], dtype=int)
        self.rec_var = np.array([self.var.get((n, "r"), -1) for n in cand], dtype=int)
        #: Solves made so far.
        self.calls = 0

    @property
    def num_variables(self) -> int:
        """Binaries of one solve (shared and outside blocks together)."""
        return len(self.names)

    def describe(self) -> str:
        """The blocks in a few words, e.g. ``"blocks: 24 x transformer.h.*, 214 binaries"``."""
        kinds = ", ".join(f"{len(lay.blocks)} x {lay.blocks[0].path.rsplit('.', 1)[0]}.*" for lay in self.layouts)
        return f"blocks: {kinds}, {self.num_variables} binaries"

    def _rules(self, prob: Problem) -> list[tuple[tuple, float | None, float | None]]:
        """The flat ILP's rules over the shared variables, each once: ``(terms, lower, upper)``."""
        var = self.var

        def saved(n):
            return ((var[(n, "s")], 1.0),) if (n, "s") in var else ()

        def rec(n):
            return ((var[(n, "r")], 1.0),) if (n, "r") in var else ()

        seen: set = set()
        rows = []

        def add(terms, lo, hi):
            acc: dict[int, float] = {}
            for j, c in terms:
                acc[j] = acc.get(j, 0.0) + c
            key = (tuple(sorted((j, c) for j, c in acc.items() if c)), lo, hi)
            if key[0] and key not in seen:
                seen.add(key)
                rows.append(key)

        for n in prob.fwd:
            if n in prob.bwd_needs and n not in prob.free_save:
                add(saved(n) + rec(n), 1.0, None)
            if (n, "r") in var:
                for a in prob.fwd_inputs[n]:
                    if a in prob.free_save:
                        continue
                    add(rec(n) + tuple((j, -c) for j, c in saved(a) + rec(a)), None, 0.0)
                if (n, "s") in var:
                    add(saved(n) + rec(n), None, 1.0)
        return rows

    def __call__(self, prob: Problem, budget_bytes: float | None, *, memory: MemoryModel | None = None,
                 rows: frozenset[int] = frozenset(), tie_break_seed: int | None = None, time_limit_s: float = 60.0,
                 minimize_memory: bool = False, max_rounds: int = 12, relax: bool = False) -> IlpResult:
        """As :func:`planner.ilp.solve_ilp`. With ``relax=True`` and ``minimize_memory=True``
        the LP relaxation is solved with no recompute cost: its peak, in
        :attr:`IlpResult.bound`, bounds the memory model's lowest peak from below."""
        t0 = time.perf_counter()
        self.calls += 1
        memory = memory if memory is not None else prob.memory
        scale = 1.0 / max(float(memory.const.max()), 1.0)
        # rows x variables: each memory row's coefficients over the shared variables
        coef = (_summed(memory.save, self.save_var, self.num_variables)
                + _summed(memory.recompute, self.rec_var, self.num_variables)) * scale
        const = memory.const * scale
        m = HighsModel(time_limit_s=time_limit_s)
        weight = prob.weights(tie_break_seed)
        cost = np.zeros(self.num_variables)
        for (node, which), j in self.var.items():
            if which == "r":
                cost[j] += weight[node]
        nv = self.num_variables
        if minimize_memory:
            cost = 0.0 * cost if relax else 1e-3 * cost
        m.add_cols(cost, np.zeros(nv), np.ones(nv), [], integer=True)
        peak = None
        if minimize_memory:
            peak = m.add_cols([1.0], [0.0], [1e30], [], integer=False)[0]
        m.add_rows([lo for _, lo, _ in self.rules], [hi for _, _, hi in self.rules],
                   [(np.array([j for j, _ in t], dtype=np.int32), np.array([c for _, c in t])) for t, _, _ in self.rules])
        budget = None if minimize_memory else float(budget_bytes) * scale
        added: list[int] = []

        def add_memory_rows(ks):
            lo, hi, entries = [], [], []
            for k in ks:
                keep = np.nonzero(np.abs(coef[k]) >= _MIN_COEF)[0]
                idx, val = keep.astype(np.int32), coef[k, keep]
                if peak is not None:
                    idx, val = np.append(idx, peak).astype(np.int32), np.append(val, -1.0)
                lo.append(None)
                hi.append(-const[k] if peak is not None else budget - const[k])
                entries.append((idx, val))
                added.append(k)
            m.add_rows(lo, hi, entries)

        add_memory_rows(sorted(set(initial_rows(memory, len(prob.fwd))) | set(rows)))
        status, x, vals = "Not Solved", None, None
        for rounds in range(1, max_rounds + 1):
            status, found = m.solve(integer=not relax)
            if not found:
                x = None
                break
            x = m.values()[:nv] if relax else np.round(m.values()[:nv])
            vals = const + coef @ x
            bound = m.values()[peak] if peak is not None else budget
            over = np.nonzero(vals > bound * (1 + 1e-9) + 1 * scale)[0]
            done = set(added)
            over = sorted((int(k) for k in over if int(k) not in done), key=lambda k: -vals[k])
            if not over:
                break
            if rounds == max_rounds:
                status = f"{status} (memory rows incomplete)"
                break
            add_memory_rows(over[:_ROWS_PER_ROUND])
        recompute = None
        if x is not None:
            recompute = frozenset(n for (n, which), j in self.var.items() if which == "r" and x[j] > 0.5)
        return IlpResult(
            recompute=recompute,
            status=status,
            seconds=time.perf_counter() - t0,
            gap=m.gap() if x is not None else None,
            objective=m.objective() if x is not None else None,
            num_rows=m.num_rows,
            model_peak=float(vals.max()) / scale if x is not None else None,
            rows=frozenset(added) | rows,
            bound=_bound(m, peak, scale, relax) if x is not None else None,
        )


def _summed(matrix: np.ndarray, var: np.ndarray, num_variables: int) -> np.ndarray:
    """Rows x variables: the columns of ``matrix`` (rows x candidates) summed by the
    variable ``var`` gives each candidate (-1: left out)."""
    out = np.zeros((matrix.shape[0], num_variables))
    cols = np.nonzero(var >= 0)[0]
    cols = cols[np.argsort(var[cols], kind="stable")]
    if len(cols):
        used, starts = np.unique(var[cols], return_index=True)
        out[:, used] = np.add.reduceat(matrix[:, cols], starts, axis=1)
    return out


def _bound(m: HighsModel, peak: int | None, scale: float, relax: bool) -> float:
    """The LP relaxation's peak in bytes (``relax``), else HiGHS's dual bound on the objective."""
    return float(m.values()[peak]) / scale if relax and peak is not None else m.bound()


#: ``solver="auto"`` uses the block ILP when a kind of block has at least this many
#: copies and repeated blocks hold at least :data:`AUTO_COVERAGE` of the forward
#: nodes; below that the flat ILP solves fast enough and is exact.
AUTO_MIN_COPIES = 8
AUTO_COVERAGE = 0.5


def block_solver(prob: Problem, *, always: bool, min_copies: int = AUTO_MIN_COPIES) -> BlockIlp | None:
    """The block ILP for ``prob``, or None when it has no repeated blocks (with
    ``always=False``: also when it is too shallow to need one, fewer than
    ``min_copies`` copies of every kind, or too irregular, see :data:`AUTO_COVERAGE`),
    and when ``highspy`` is missing."""
    if backend_name() != "highs":
        return None  # the block ILP runs on HiGHS directly; the flat ILP runs on CBC too
    blocks = find_blocks(prob.gp)
    layouts = block_layouts(prob, blocks)
    if not layouts:
        return None
    if not always and (max(len(lay.blocks) for lay in layouts) < min_copies or blocks.coverage < AUTO_COVERAGE):
        return None
    return BlockIlp(prob, layouts)


def peak_lower_bound(prob: Problem, memory: MemoryModel | None = None) -> float:
    """A lower bound on the lowest peak of the linear memory model (``memory``,
    default ``prob.memory``) in bytes: the LP relaxation of the least-peak ILP, every
    value with its own variables. The model estimates recomputed values' live
    intervals, so this bounds the planner's minimum as the ILP sees it, not the
    exact simulator's."""
    res = BlockIlp(prob, [])(prob, None, memory=memory, minimize_memory=True, relax=True, max_rounds=40)
    if res.bound is None:
        raise RuntimeError(f"the least-peak LP relaxation has no solution ({res.status})")
    return res.bound
