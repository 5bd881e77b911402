"""Save again what a fitting plan recomputes without need, checked by exact simulation.

The solvers search the graphs the partition emits, in the order it emits them
(:meth:`planner.problem.Problem.unarranged`). The runtime then arranges those
graphs for memory (:func:`planner.order.arrange`), which lowers the step's peak,
so a plan found for a budget often fits with room to spare and recomputes values
it could keep. So does a plan for Inductor, whose graphs are not arranged: the
ILP's rows do not see the fused simulation of a graph that convolves on the CPU
(:mod:`planner.inductor_fusion`), and a 4-layer GPT-2's plan at 30% of its
activations fit with 8 MiB to spare. :func:`trim` hands that room back: it keeps
values again, the costliest recomputation first, as long as the exact simulation
of the step as run (:meth:`planner.problem.Problem.evaluate`) stays within the budget.

Arranging a step costs tens of simulations, so candidates are first judged on
the unarranged step (one simulation each) less an estimate of what arrangement
saves (interpolated between what it saves on the plan trimmed and on the step
that recomputes nothing), and only the likely ones are arranged: at most
:data:`MAX_ARRANGED` arranged evaluations besides those two.
Keeping a value instead of recomputing it is always a valid plan (a kept value
needs no inputs in backward), and the result is never costlier than the plan it
starts from.

:func:`keep_aliases` then keeps the views a plan rebuilds in backward from storage
backward holds anyway (a transpose of a weight, a view of a saved value): the ILP has
no variable for values that own no bytes, so it writes them as recomputed. Keeping
them costs no bytes when the exact simulation says so, and spares backward the ops.
"""

from __future__ import annotations

import dataclasses

from .evaluation import Evaluation
from .plan_type import SolverInfo
from .problem import Problem

__all__ = ["trim", "keep_aliases", "as_run", "MAX_ARRANGED", "MAX_SINGLES"]

#: Arranged evaluations one :func:`trim` makes at most.
MAX_ARRANGED = 6
#: Single units :func:`trim` considers keeping after its bisection.
MAX_SINGLES = 12


class _Probe:
    """Evaluations of candidate recompute sets: a cheap estimate, and the exact
    arranged peak within a budget of calls."""

    def __init__(self, prob: Problem, ev: Evaluation, budget: int, calls: int):
        self.prob, self.budget, self.calls = prob, budget, calls
        self.search = prob.unarranged()
        self.size = len(ev.recompute)
        #: What arrangement saves on the plan being trimmed and on the step that
        #: recomputes nothing (bytes).
        self.gains = tuple(max(0, self.search.evaluate(r).sim.peak_bytes - prob.evaluate(r).sim.peak_bytes)
                           for r in (ev.recompute, frozenset()))

    def likely(self, recompute: frozenset[str]) -> bool:
        """Whether the unarranged step, less the gain interpolated between the plan's
        and the no-recompute step's by the share of values kept, fits."""
        kept = 1 - len(recompute) / self.size
        gain = self.gains[0] + (self.gains[1] - self.gains[0]) * kept
        return self.search.evaluate(recompute).sim.peak_bytes - gain <= self.budget

    def fits(self, recompute: frozenset[str]) -> Evaluation | None:
        """The arranged evaluation when it fits (None when not, or no calls are left)."""
        if self.calls <= 0:
            return None
        self.calls -= 1
        ev = self.prob.evaluate(recompute)
        return ev if ev.sim.peak_bytes <= self.budget else None


def trim(prob: Problem, ev: Evaluation, budget: int, *, max_arranged: int = MAX_ARRANGED) -> Evaluation:
    """``ev`` (evaluated by ``prob``) or a plan that recomputes a subset of its values,
    fits ``budget`` (bytes, exact simulation as ``prob`` evaluates) and ranks no worse
    under ``prob``'s objective.

    Values are kept by unit: a multi-output op with the values taken out of it. The
    largest ``k`` such that keeping the ``k`` costliest recomputed units likely fits
    (bisection on the estimate), confirmed or lowered by bisection on arranged
    evaluations; then up to :data:`MAX_SINGLES` single units, costliest first, while
    calls are left."""
    if not ev.recompute or ev.sim.peak_bytes > budget or not (prob.arrange or prob.gp.joint.executor == "inductor"):
        return ev
    probe = _Probe(prob, ev, budget, max_arranged)
    nodes = prob.gp.nodes
    # a multi-output op and the values taken out of it are kept or recomputed together
    units: dict[str, set[str]] = {}
    for n in ev.recompute:
        units.setdefault(prob.parent.get(n, n), set()).add(n)

    def cost(u: str) -> tuple:
        return (-sum(nodes[n].time_s for n in units[u]), -sum(nodes[n].flops for n in units[u]), u)

    order = sorted(units, key=cost)

    def recomputing(k: int) -> frozenset[str]:
        return frozenset(n for u in order[k:] for n in units[u])

    lo, hi = 0, len(order)  # keeping order[:lo] is likely to fit; keeping order[:hi + 1] is not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if probe.likely(recomputing(mid)) else (lo, mid - 1)
    best, low, k = ev, 0, lo  # keeping order[:low] fits; k: the next count to try
    while k > low:
        got = probe.fits(recomputing(k))
        if got is not None:
            best, low = got, k
            break
        if probe.calls <= 0:
            break
        k = (low + k) // 2 if k - low > 1 else low
    for u in order[low:][:MAX_SINGLES]:
        if probe.calls <= 0:
            break
        if units[u] <= best.recompute and probe.likely(best.recompute - units[u]):
            got = probe.fits(best.recompute - units[u])
            if got is not None:
                best = got
    return best if prob.rank(best) <= prob.rank(ev) else ev


def keep_aliases(prob: Problem, ev: Evaluation, budget: int) -> Evaluation:
    """``ev`` with the recomputed values that own no bytes (views, transposes,
    detaches: not a multi-output op or a value taken out of one) kept instead, where
    every storage they refer to is held in backward anyway (a parameter, a buffer, an
    input, or a value the plan keeps); one exact evaluation, taken when it fits
    ``budget`` and ranks no worse, else ``ev``."""
    static = prob.gp.static_storages
    held = set(static).union(*(prob.gp.nodes[x].storages for x in ev.saved))
    multi = set(prob.parent.values())
    free = frozenset(n for n in ev.recompute
                     if prob.own_bytes.get(n, 1) == 0 and n not in prob.parent and n not in multi
                     and set(prob.gp.nodes[n].storages) <= held)
    if not free:
        return ev
    kept = prob.evaluate(ev.recompute - free)
    return kept if kept.sim.peak_bytes <= budget and prob.rank(kept) <= prob.rank(ev) else ev


def as_run(prob: Problem, found: tuple[Evaluation, SolverInfo], usable: int, *,
           trimmed: bool = True) -> tuple[Evaluation, SolverInfo] | None:
    """A plan the solvers found on the graphs as split (``found``), evaluated as the
    runtime runs it (arranged, :meth:`Problem.evaluate`) and, with ``trimmed``,
    trimmed, its solver record saying how many values were kept again; None when it
    does not fit ``usable``. (``solver="sqrt"`` plans stay as sqrt(L) makes them: the
    baseline the ILP's plans are never costlier than.)"""
    ev, info = found
    run = prob.evaluate(ev.recompute)
    if run.sim.peak_bytes > usable:
        return None
    if not trimmed:
        return run, info
    kept = trim(prob, run, usable)
    if kept is not run:
        info = dataclasses.replace(info, status=f"{info.status}; {len(run.recomputed) - len(kept.recomputed)} values kept again (planner.trim)")
    aliases = keep_aliases(prob, kept, usable)
    if aliases is not kept:
        info = dataclasses.replace(info, status=f"{info.status}; {len(kept.recomputed) - len(aliases.recomputed)} views kept")
    return aliases, info
