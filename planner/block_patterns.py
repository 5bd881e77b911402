"""The choices one kind of repeated block can make, by position in the block.

A *pattern* says which of a block's forward values are recomputed and which are
saved; every copy of a kind (:mod:`planner.blocks`) can take any pattern of the
kind. :class:`KindLayout` is what the solvers read of a kind: which positions
may be recomputed or saved, which backward needs, and the dependencies inside
the block. :class:`PatternIlp` holds the rules a pattern must follow (backward's
inputs saved or recomputed, a recomputed value's inputs inside the block saved
or recomputed, never both for one value) and finds the pattern of least cost
under any prices per position: with the block's recompute times and a price per
saved byte it gives the trade-off between recomputation and what the block keeps
(:func:`initial_patterns`); with the duals of the block master
(:mod:`planner.block_master`) it gives the pattern that lowers the master's cost
the most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocks import Block
from .highs import HighsModel
from .memory_model import MemoryModel
from .problem import Problem

__all__ = ["Pattern", "KindLayout", "kind_layout", "PatternIlp", "initial_patterns", "FRONTIER"]

#: Most patterns :func:`initial_patterns` returns per kind.
FRONTIER = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class Pattern:
    """One choice for a block: positions in :attr:`Block.forward`."""

    #: Positions recomputed in backward.
    recompute: frozenset[int]
    #: Positions saved for backward (memory-model candidates only).
    save: frozenset[int]


@dataclass(frozen=True, kw_only=True, slots=True)
class KindLayout:
    """One kind of block as the solvers see it, by position."""

    #: The copies, in forward order.
    blocks: tuple[Block, ...]
    #: Positions that may be recomputed / are memory-model candidates (saved at a cost).
    recomputable: tuple[int, ...]
    candidates: tuple[int, ...]
    #: Positions backward reads; positions saved for free (held anyway).
    needed: frozenset[int]
    free: frozenset[int]
    #: ``(i, j)``: recomputing position i needs position j.
    deps: tuple[tuple[int, int], ...]
    #: Per copy, the memory-model column of each candidate position (copies x candidates).
    columns: np.ndarray

    @property
    def kind(self) -> str:
        return self.blocks[0].kind


def _positions(prob: Problem, memory: MemoryModel, block: Block) -> tuple:
    fwd = block.forward
    pos = {n: i for i, n in enumerate(fwd)}
    cand = set(memory.candidates)
    deps = tuple((i, pos[a]) for i, n in enumerate(fwd) if n in prob.can_recompute
                 for a in prob.fwd_inputs[n] if a in pos)
    return (tuple(i for i, n in enumerate(fwd) if n in prob.can_recompute),
            tuple(i for i, n in enumerate(fwd) if n in cand),
            frozenset(i for i, n in enumerate(fwd) if n in prob.bwd_needs),
            frozenset(i for i, n in enumerate(fwd) if n in prob.free_save), deps)


def kind_layout(prob: Problem, memory: MemoryModel, blocks: list[Block]) -> KindLayout | None:
    """The layout of the kind of ``blocks``; copies whose values differ in what may be
    recomputed or saved (a copy whose output is the model's) are left out, and None is
    returned when fewer than two remain."""
    ref = _positions(prob, memory, blocks[len(blocks) // 2])
    same = [b for b in blocks if _positions(prob, memory, b) == ref]
    if len(same) < 2:
        return None
    recomputable, candidates, needed, free, deps = ref
    col = {n: i for i, n in enumerate(memory.candidates)}
    columns = np.array([[col[b.forward[i]] for i in candidates] for b in same], dtype=int).reshape(len(same), len(candidates))
    return KindLayout(blocks=tuple(same), recomputable=recomputable, candidates=candidates, needed=needed,
                      free=free, deps=deps, columns=columns)


class PatternIlp:
    """The rules of one kind's patterns as a small MILP, solved under any prices."""

    def __init__(self, layout: KindLayout, *, time_limit_s: float = 60.0):
        self.layout = layout
        nr, ns = len(layout.recomputable), len(layout.candidates)
        self.nr = nr
        self.model = m = HighsModel(time_limit_s=time_limit_s)
        m.add_cols(np.zeros(nr + ns), np.zeros(nr + ns), np.ones(nr + ns), [], integer=True)
        m.add_rows(*self.rules())

    def rules(self) -> tuple[list, list, list]:
        """The rules as rows ``(lower, upper, [(columns, values)])`` over the columns
        ``r`` per recomputable position, then ``s`` per candidate position."""
        layout, nr = self.layout, len(self.layout.recomputable)
        r = {i: k for k, i in enumerate(layout.recomputable)}
        s = {i: nr + k for k, i in enumerate(layout.candidates)}
        lower, upper, rows = [], [], []

        def add(terms: dict[int, float], lo, hi):
            if terms:
                lower.append(lo)
                upper.append(hi)
                rows.append((np.array(list(terms), dtype=np.int32), np.array(list(terms.values()))))

        for i in sorted(layout.needed - layout.free):
            add({c: 1.0 for c in (r.get(i), s.get(i)) if c is not None}, 1.0, None)
        for i, j in layout.deps:
            if j in layout.free:
                continue
            terms = {r[i]: 1.0}
            for c in (r.get(j), s.get(j)):
                if c is not None:
                    terms[c] = terms.get(c, 0.0) - 1.0
            add(terms, None, 0.0)
        for i in layout.candidates:
            if i in r:
                add({r[i]: 1.0, s[i]: 1.0}, None, 1.0)
        return lower, upper, rows

    def pattern_of(self, x: np.ndarray) -> Pattern:
        """The pattern of 0/1 values ``x`` over the columns of :meth:`rules`."""
        lay = self.layout
        x = np.round(x).astype(int)
        return Pattern(recompute=frozenset(i for k, i in enumerate(lay.recomputable) if x[k]),
                       save=frozenset(i for k, i in enumerate(lay.candidates) if x[self.nr + k]))

    def best(self, r_cost: np.ndarray, s_cost: np.ndarray) -> tuple[Pattern, float]:
        """The pattern of least ``r_cost @ recomputed + s_cost @ saved`` (prices per
        recomputable and per candidate position), and that cost."""
        m = self.model
        cost = np.concatenate([np.asarray(r_cost, float), np.asarray(s_cost, float)])
        cols = np.arange(len(cost), dtype=np.int32)
        m.h.changeColsCost(len(cols), cols, cost)
        status, found = m.solve(integer=True)
        if not found:
            raise ValueError(f"block {self.layout.blocks[0].path}: no pattern satisfies the ILP's rules ({status})")
        x = np.round(m.values())
        return self.pattern_of(x), float(cost @ x)


def initial_patterns(ilp: PatternIlp, weights: np.ndarray, sizes: np.ndarray, *, limit: int = FRONTIER) -> list[Pattern]:
    """The block's trade-off between recomputation and saved bytes: the cheapest
    pattern, then the cheapest that saves fewer bytes than the last, and so on (each
    keeping the fewest bytes among equally cheap ones), up to ``limit`` patterns.
    ``weights``: recompute cost per recomputable position; ``sizes``: bytes per
    candidate position."""
    lay = ilp.layout
    nr, ns = len(lay.recomputable), len(lay.candidates)
    total = float(sizes.sum()) or 1.0
    rel = np.asarray(sizes, float) / total
    per_byte = (float(weights.sum()) or 1.0)
    m = HighsModel(gap=1e-9)
    cost = np.concatenate([np.asarray(weights, float) + 1e-9 * per_byte, 1e-6 * per_byte * rel])
    m.add_cols(cost, np.zeros(nr + ns), np.ones(nr + ns), [], integer=True)
    m.add_rows(*ilp.rules())
    carry_row = m.add_rows([None], [None], [(np.arange(nr, nr + ns, dtype=np.int32), rel)]).start
    found: list[Pattern] = []
    while len(found) < limit:
        status, ok = m.solve(integer=True)
        if not ok:
            break
        x = np.round(m.values())
        found.append(ilp.pattern_of(x))
        carry = float(rel @ x[nr:])
        if carry <= 0:
            break
        # fewer bytes by 0.2% of the block at least: steps of a few small tensors are left out
        m.h.changeRowBounds(carry_row, -m._hs.kHighsInf, carry - 2e-3)
    return found
