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


@dataclass(frozen=True, kw_only=True, slots=True)
class SqrtResult:
    """The best segmentation found, and every one tried."""

    #: The chosen plan, None when none fits the budget.
    evaluation: Evaluation | None
    #: Number of segment boundaries of the chosen plan.
    segments: int
    #: ``"feasible"``, ``"infeasible"`` or ``"lowest peak"`` (no budget given).
    status: str
    #: Wall-clock seconds of the search.
    seconds: float
    #: Every plan tried: (segments, peak bytes, cost seconds).
    tried: tuple[tuple[int, int, float], ...] = ()


def _data_dependent(prob: Problem) -> set[str]:
    """Forward nodes that depend on the model's inputs. The rest (views of weights,
    masks built from constants and shapes) is computed once and shared by every
    layer; left in, it would join all layers and hide the boundaries between them."""
    gm = prob.gp.gm
    roles = prob.gp.joint.primal_roles
    inputs = {p.name for p, role in zip(gm.graph.find_nodes(op="placeholder"), roles) if role == "input"}
    by_name = {n.name: n for n in gm.graph.nodes}
    dep: set[str] = set()
    for n in prob.fwd:
        if any(a.name in inputs or a.name in dep for a in by_name[n].all_input_nodes):
            dep.add(n)
    return dep


def articulation_points(prob: Problem) -> list[str]:
    """Candidate boundaries: savable articulation points of the forward graph of
    input-dependent values, in order."""
    dep = _data_dependent(prob)
    g = nx.Graph()
    g.add_nodes_from(n for n in prob.fwd if n in dep)
    for n in prob.fwd:
        if n not in dep:
            continue
        for a in prob.fwd_inputs[n]:
            if a in dep:
                g.add_edge(n, a)
    points = set(nx.articulation_points(g))
    return [n for n in prob.fwd if n in points and n in prob.can_save]


def sqrt_plan(prob: Problem, boundaries: list[str]) -> frozenset[str]:
    """Recompute everything recomputable except the boundaries."""
    keep = set(boundaries)
    return frozenset(n for n in prob.fwd if n in prob.can_recompute and n not in keep)


def _pick(points: list[str], k: int) -> list[str]:
    """``k`` points spread evenly over ``points``."""
    if k <= 0 or not points:
        return []
    if k >= len(points):
        return list(points)
    step = len(points) / (k + 1)
    return [points[min(len(points) - 1, int(round(step * (i + 1))) - 1)] for i in range(k)]


def _greedy(prob: Problem, points: list[str], threshold: float) -> list[str]:
    """Chen et al.'s greedy: walk forward adding up the bytes of values produced
    since the last boundary; once past ``threshold``, the next candidate point
    becomes a boundary."""
    pts = set(points)
    chosen, acc = [], 0.0
    for n in prob.fwd:
        acc += prob.own_bytes.get(n, 0)
        if n in pts and acc >= threshold:
            chosen.append(n)
            acc = 0.0
    return chosen


def _candidate_sets(prob: Problem, points: list[str]) -> list[list[str]]:
    if not points:
        return [[]]
    # Cheap boundaries first: the smallest articulation points (in a transformer,
    # the residual stream rather than attention probabilities).
    sizes = [prob.own_bytes.get(n, 0) for n in points]
    quartile = sorted(sizes)[len(sizes) // 4]
    small = [n for n, b in zip(points, sizes) if b <= 1.5 * quartile]
    total = float(sum(prob.own_bytes.get(n, 0) for n in prob.fwd)) or 1.0
    sets = []
    for pts in (small, points):
        L = len(pts)
        base = max(1, round(math.sqrt(L)))
        sets += [_pick(pts, k) for k in sorted({max(1, min(L, round(base * f))) for f in (0.5, 1, 2, 4)} | {L})]
        for f in (0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.4):
            sets.append(_greedy(prob, pts, total * f))
    unique, seen = [], set()
    for s in sets:
        key = tuple(s)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def solve_sqrt(prob: Problem, budget_bytes: float | None) -> SqrtResult:
    """Cheapest sqrt(L)-style plan within ``budget_bytes`` (or the lowest peak when None),
    on the graphs as split (:meth:`Problem.unarranged`)."""
    start = time.perf_counter()
    prob = prob.unarranged()
    points = articulation_points(prob)
    tried = []
    best_fit: tuple[tuple, Evaluation, int] | None = None
    lowest: tuple[int, Evaluation, int] | None = None
    for boundaries in _candidate_sets(prob, points):
        k = len(boundaries)
        ev = prob.evaluate(sqrt_plan(prob, boundaries))
        tried.append((k, ev.sim.peak_bytes, ev.cost_s))
        if lowest is None or ev.sim.peak_bytes < lowest[0]:
            lowest = (ev.sim.peak_bytes, ev, k)
        if budget_bytes is not None and ev.sim.peak_bytes <= budget_bytes:
            if best_fit is None or prob.rank(ev) < best_fit[0]:
                best_fit = (prob.rank(ev), ev, k)
    secs = time.perf_counter() - start
    if budget_bytes is None:
        assert lowest is not None
        return SqrtResult(evaluation=lowest[1], segments=lowest[2], status="lowest peak", seconds=secs, tried=tuple(tried))
    if best_fit is None:
        return SqrtResult(evaluation=None, segments=0, status="infeasible", seconds=secs, tried=tuple(tried))
    return SqrtResult(evaluation=best_fit[1], segments=best_fit[2], status="feasible", seconds=secs, tried=tuple(tried))
