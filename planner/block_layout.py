"""One kind of repeated block as the block ILP sees it, by position in the block.

Every copy of a kind (:mod:`planner.blocks`) has the same forward nodes in the
same order; :class:`KindLayout` says which positions may be recomputed or are
memory-model candidates, which backward needs, which are saved for free, the
dependencies inside the block, and where each copy's candidates sit among the
memory model's columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocks import Block
from .memory_model import MemoryModel
from .problem import Problem

__all__ = ["KindLayout", "kind_layout"]


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
