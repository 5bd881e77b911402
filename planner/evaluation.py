"""The :class:`Evaluation` record: one recompute set, checked by the exact simulator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .simulate import SimResult

__all__ = ["Evaluation"]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Evaluation:
    """A recompute set, split into a schedule and simulated exactly (:meth:`planner.problem.Problem.evaluate`)."""

    #: The forward values the plan recomputes.
    recompute: frozenset[str]
    #: Values forward hands to backward, in the order the backward graph takes them.
    saved: tuple[str, ...]
    #: Forward nodes that actually run again in backward, in run order.
    recomputed: tuple[str, ...]
    #: The simulated peak of the split step.
    sim: SimResult
    #: Estimated seconds and FLOPs of the recomputation.
    cost_s: float
    flops: int
    #: Backward graph's call_function nodes in run order, and each one's inputs.
    bwd_order: tuple[str, ...]
    bwd_inputs: Mapping[str, tuple[str, ...]]
