"""A captured step's graph profiles, one per dropout mode, each made once for every budget the step is planned at.

:class:`planner.api.PreparedStep` plans one capture at one budget or several; each
plan needs the step profiled (``profiles.profile_graph``: FLOPs, bytes, times, and
op temporaries measured by running the nodes) in the dropout mode it was captured
in, and often also with masks replayed from the RNG state (``with_dropout``). The
profile depends on the captured graph, the mode, the target and ``measure_time``,
never on the budget: :class:`StepProfiles` makes each mode's once and keeps it.
"""

from __future__ import annotations

from collections.abc import Callable

from profiles.capture import with_dropout
from profiles.graph_profile import GraphProfile, profile_graph
from profiles.joint import JointGraph

__all__ = ["StepProfiles"]


class StepProfiles:
    """The profiles of ``captured`` by dropout mode, for one ``target`` and ``measure_time``."""

    __slots__ = ("captured", "_target", "_measure_time", "_by_mode")

    def __init__(self, captured: JointGraph, *, target: str | None, measure_time: bool):
        #: The step as captured (its dropout mode is ``captured.dropout``).
        self.captured = captured
        self._target = target
        self._measure_time = measure_time
        self._by_mode: dict[str, GraphProfile] = {}

    def profile(self, dropout: str, log: Callable[[str], None]) -> GraphProfile:
        """The step profiled with dropout as ``dropout`` (``"mask"`` or ``"replay"``);
        profiled on the first call for that mode (``log`` then receives a line)."""
        if dropout not in self._by_mode:
            log(f"profiling (dropout: {dropout})")
            joint = self.captured if dropout == self.captured.dropout else with_dropout(self.captured, dropout)
            self._by_mode[dropout] = profile_graph(joint, target=self._target, measure_time=self._measure_time)
        return self._by_mode[dropout]

    def drop_tensors(self) -> None:
        """Free the example tensors the capture and the profiles' graphs hold, and the profiles."""
        self.captured.drop_tensors()
        for gp in self._by_mode.values():
            gp.joint.drop_tensors()
        self._by_mode.clear()
