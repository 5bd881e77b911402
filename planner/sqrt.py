"""The sqrt(L) heuristic of Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost".

Segment boundaries are chosen among the articulation points of the forward graph
(values whose removal disconnects it: for a transformer, the residual stream
between blocks). Boundaries are saved, everything else inside a segment is
recomputed when backward reaches it. About sqrt(L) boundaries for L candidate
points; the count is varied around that and the cheapest plan within the budget
(by exact simulation) wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import networkx as nx

from .problem import Evaluation, Problem

__all__ = ["SqrtResult", "articulation_points", "solve_sqrt", "sqrt_plan"]


@dataclass(frozen=True)
class SqrtResult:
    evaluation: Evaluation | None
    segments: int
    status: str
    seconds: float
    #: Every plan tried: (segments, peak bytes, cost seconds).
    tried: tuple[tuple[int, int, float], ...] = ()


def articulation_points(prob: Problem) -> list[str]:
    """Candidate boundaries: savable articulation points of the forward graph, in order."""
    g = nx.Graph()
    g.add_nodes_from(prob.fwd)
    for n in prob.fwd:
        for a in prob.fwd_inputs[n]:
            g.add_edge(n, a)
    points = set(nx.articulation_points(g))
    return [n for n in prob.fwd if n in points and n in prob.can_save]


def sqrt_plan(prob: Problem, boundaries: list[str]) -> frozenset[str]:
    """Recompute everything recomputable except the boundaries."""
    keep = set(boundaries)
    return frozenset(n for n in prob.fwd if n in prob.can_recompute and n not in keep)


def _pick(points: list[str], k: int) -> list[str]:
    if k <= 0 or not points:
        return []
    if k >= len(points):
        return list(points)
    step = len(points) / (k + 1)
    return [points[min(len(points) - 1, int(round(step * (i + 1))) - 1)] for i in range(k)]


def solve_sqrt(prob: Problem, budget_bytes: float | None) -> SqrtResult:
    """Cheapest sqrt(L)-style plan within ``budget_bytes`` (or the lowest peak when None)."""
    start = time.perf_counter()
    points = articulation_points(prob)
    L = len(points)
    base = max(1, round(math.sqrt(L))) if L else 0
    counts = sorted({max(0, min(L, round(base * f))) for f in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4)} | {L})
    tried = []
    best_fit: tuple[float, Evaluation, int] | None = None
    lowest: tuple[int, Evaluation, int] | None = None
    for k in counts:
        ev = prob.evaluate(sqrt_plan(prob, _pick(points, k)))
        tried.append((k, ev.sim.peak_bytes, ev.cost_s))
        if lowest is None or ev.sim.peak_bytes < lowest[0]:
            lowest = (ev.sim.peak_bytes, ev, k)
        if budget_bytes is not None and ev.sim.peak_bytes <= budget_bytes:
            if best_fit is None or ev.cost_s < best_fit[0]:
                best_fit = (ev.cost_s, ev, k)
    secs = time.perf_counter() - start
    if budget_bytes is None:
        assert lowest is not None
        return SqrtResult(lowest[1], lowest[2], "lowest peak", secs, tuple(tried))
    if best_fit is None:
        return SqrtResult(None, 0, "infeasible", secs, tuple(tried))
    return SqrtResult(best_fit[1], best_fit[2], "feasible", secs, tuple(tried))
