"""Save again what a fitting plan recomputes without need, checked by exact simulation.

The ILP's memory rows describe the graphs the partition emits, in the order it
emits them. The runtime then arranges those graphs for memory
(:func:`planner.order.arrange`), which lowers the step's peak, so a plan the ILP
found for a budget often fits with room to spare and recomputes values it could
keep. :func:`trim` hands that room back: it keeps values again, the costliest
recomputation first, as long as the exact simulation of the arranged step
(:meth:`planner.problem.Problem.evaluate`) stays within the budget. Keeping a value
instead of recomputing it is always a valid plan (a kept value needs no inputs in
backward), and the result is never costlier than the plan it starts from.
"""

from __future__ import annotations

from .evaluation import Evaluation
from .problem import Problem

__all__ = ["trim", "MAX_SINGLES"]

#: Single values :func:`trim` tries to keep after its bisection over the costliest ones.
MAX_SINGLES = 12


def _fits(prob: Problem, recompute: frozenset[str], budget: int) -> Evaluation | None:
    ev = prob.evaluate(recompute)
    return ev if ev.sim.peak_bytes <= budget else None


def trim(prob: Problem, ev: Evaluation, budget: int) -> Evaluation:
    """``ev`` or a plan that recomputes a subset of its values, fits ``budget`` (bytes,
    exact simulation) and ranks no worse under ``prob``'s objective.

    First the largest ``k`` such that keeping the ``k`` costliest recomputed values
    still fits (bisection), then up to :data:`MAX_SINGLES` of the rest one at a time,
    costliest first."""
    if not ev.recompute or ev.sim.peak_bytes > budget:
        return ev
    nodes = prob.gp.nodes
    order = sorted(ev.recompute, key=lambda n: (-nodes[n].time_s, -nodes[n].flops, n))
    best, lo, hi = ev, 0, len(order)  # keeping order[:lo] fits; keeping order[:hi + 1] is untested or does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        got = _fits(prob, frozenset(order[mid:]), budget)
        if got is not None:
            best, lo = got, mid
        else:
            hi = mid - 1
    rest = [n for n in order[lo:] if n in best.recompute]
    for n in rest[:MAX_SINGLES]:
        got = _fits(prob, best.recompute - {n}, budget)
        if got is not None:
            best = got
    return best if prob.rank(best) <= prob.rank(ev) else ev
