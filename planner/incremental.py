"""The step peak of a schedule with one node moved, from one simulation of the schedule.

:func:`planner.order.improve_order` tries dozens of single-node moves per round. Moving
the node at position ``i`` of one graph to ``j`` changes that graph's order only from
``m = min(i, j)`` to ``M = max(i, j)``. Before ``m`` the same nodes ran in the same
order. After ``M`` the same nodes have run and the same values have died (a value dies
at its last reader, and the nodes up to ``M`` are the same set), so every storage has
the same references as in the schedule, and the rest of the step is the schedule's.
:class:`MovePeaks` simulates the schedule once (:func:`planner.simulate.simulate`'s
state, recording each storage's references over the graph) and then each move's window
alone: the move's peak is the largest of the points before ``m``, the window's points
and the points after ``M``, exactly :func:`~planner.simulate.simulate`'s peak of the
moved schedule. A move whose window cannot lower the peak (the points outside it
already reach the level to beat) is not simulated at all.

That holds while the moved schedule has the same profile. With ops writing into dying
inputs (:mod:`planner.reuse`) it does when the move changes no write: a write depends on
the order only through where its input's storage is last used, which the move changes
only inside the window. When a writer in the window may decide otherwise, its writes are
planned again (:func:`~planner.reuse.plan_reuse`), and a move that changes them is left
to the caller (:meth:`MovePeaks.peak` returns None) to simulate in full.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import replace

from profiles.graph_profile import GraphProfile

from .reuse import Reuse, out_variant, plan_reuse
from .schedule import GraphOrder, Schedule
from .simulate import _Liveness, _run_step  # the simulator's own state and step, recorded
from .training_loop import TrainingLoop

__all__ = ["MovePeaks", "moved"]


def moved(order: GraphOrder, i: int, j: int) -> GraphOrder:
    """``order`` with the node at position ``i`` moved to position ``j``."""
    nodes = list(order.nodes)
    nodes.insert(j, nodes.pop(i))
    return GraphOrder(nodes=tuple(nodes), outputs=order.outputs)


class _Recording(_Liveness):
    """The simulator's state, recording during one phase's graph each storage's
    reference count after every change, and the live bytes before each node."""

    def __init__(self, gp: GraphProfile, granularity: int, engine, held: int, phase: str):
        super().__init__(gp, granularity, engine, False, held)
        self.phase = phase
        self.active = False
        #: Every point's bytes, in step order; index of the graph's first point there.
        self.totals: list[int] = []
        self.first = 0
        #: Events: per storage, stamps (2k for an allocation before the graph's point
        #: ``k``, 2k - 1 for a free after point ``k - 1``) and the count after each.
        self.stamps: dict[int, list[int]] = {}
        self.counts: dict[int, list[int]] = {}
        self.refs0: dict[int, int] = {}
        #: Live bytes (beyond static ones) before each node of the graph allocates.
        self.live_before: list[int] = []
        self.graph_copies: dict[str, tuple[int, ...]] = {}
        self._k = 0
        self._allocated = 0

    def run(self, order: GraphOrder, phase: str) -> list[str]:
        if phase != self.phase:
            return super().run(order, phase)
        self.refs0, self.first, self.active = dict(self.refs), len(self.totals), True
        try:
            return super().run(order, phase)
        finally:
            self.active, self.graph_copies = False, self.copies

    def _log(self, storages, stamp: int) -> None:
        for s in storages:
            if s not in self.static:
                self.stamps.setdefault(s, []).append(stamp)
                self.counts.setdefault(s, []).append(self.refs[s])

    def acquire(self, storages) -> None:
        before = self.live
        super().acquire(storages)
        if self.active:
            self._allocated += self.live - before
            self._log(storages, 2 * self._k)

    def release(self, storages) -> None:
        super().release(storages)
        if self.active:
            self._log(storages, 2 * self._k - 1)

    def record(self, name: str, phase: str, temp_bytes: int) -> None:
        if self.active:
            self.live_before.append(self.live - self._allocated)
            self._allocated, self._k = 0, self._k + 1
        super().record(name, phase, temp_bytes)

    def point(self, name: str, phase: str, total: int) -> None:
        self.totals.append(total)
        super().point(name, phase, total)

    def count_before(self, s: int, m: int) -> int:
        """References to storage ``s`` just before the graph's node ``m`` allocates."""
        stamps = self.stamps.get(s)
        k = bisect_left(stamps, 2 * m) if stamps else 0
        return self.counts[s][k - 1] if k else self.refs0.get(s, 0)


class MovePeaks:
    """One graph of a schedule, simulated once, and the step peak with any one of its
    nodes moved (:meth:`peak`).

    ``profile`` is the profile the schedule is simulated with: ``plain`` with
    ``reuse`` applied (:func:`~planner.reuse.profile_with_reuse`), or ``plain`` itself
    when ``reuse`` is None; ``memo`` is :func:`~planner.reuse.plan_reuse`'s for ``plain``."""

    def __init__(self, plain: GraphProfile, schedule: Schedule, profile: GraphProfile, graph: str, *,
                 reuse: Reuse | None, memo: dict, granularity: int = 1, engine=None):
        self.plain, self.schedule, self.graph, self.reuse, self.memo = plain, schedule, graph, reuse, memo
        self.order = getattr(schedule, graph)
        st = self.state = _Recording(profile, granularity, engine, 0, graph)
        _run_step(st, profile, schedule, engine, TrainingLoop())
        n, totals = len(self.order.nodes), st.totals
        #: The most bytes of the points before the graph's node k, and from its node k on.
        self.pre = [max(totals[:st.first], default=0)] * (n + 1)
        for k in range(1, n + 1):
            self.pre[k] = max(self.pre[k - 1], totals[st.first + k - 1])
        self.post = [0] * (n + 1)
        self.post[n] = max(totals[st.first + n:], default=0)
        for k in range(n - 1, -1, -1):
            self.post[k] = max(self.post[k + 1], totals[st.first + k])
        #: The gradient reduction's bytes after backward's last node (0 without an engine).
        self.engine_end = engine.end if engine is not None else None
        self.end = st.level + engine.end if engine is not None else 0
        self.last_use: dict[str, int] = {}
        for k, (_, _, inputs) in enumerate(self.order.nodes):
            for a in inputs:
                self.last_use[a] = k
        self.outputs = set(self.order.outputs)
        if reuse is not None:
            self._index_writes()

    def peak(self, i: int, j: int, *, stop_at: int | None = None) -> int | None:
        """The step peak with the graph's node ``i`` moved to position ``j`` (with
        ``stop_at``: some point's bytes of at least ``stop_at`` when the peak reaches
        it), as :func:`~planner.simulate.simulate` gives it; None when the move changes
        which ops write into their inputs."""
        m, M = min(i, j), max(i, j)
        at_end = self.engine_end is not None and self.graph == "backward" and M == len(self.order.nodes) - 1
        bound = max(self.pre[m], self.post[M + 1], 0 if at_end else self.end)
        if stop_at is not None and bound >= stop_at:
            return bound
        nodes = list(self.order.nodes[m:M + 1])
        nodes.insert(j - m, nodes.pop(i - m))
        if self.reuse is not None and not self._same_writes(nodes, m, M, i, j):
            return None
        top, level = self._window(nodes, m, M, stop_at)
        return max(bound, top, level + self.engine_end if at_end and level is not None else 0)

    def _window(self, nodes, m: int, M: int, stop_at: int | None) -> tuple[int, int | None]:
        """The most bytes of the window's points (or the first at least ``stop_at``),
        and the level at its last node (None when stopped)."""
        st = self.state
        info, copies, sizes, static = st.info, st.graph_copies, st.sizes, st.static
        base_last, outputs, backward = self.last_use, self.outputs, self.graph == "backward"
        offset = st.static_bytes + st.extra[self.graph]
        last: dict[str, int] = {}
        for k, (_, _, inputs) in enumerate(nodes, m):
            for a in inputs:
                last[a] = k
        refs: dict[int, int] = {}
        live, top, level = st.live_before[m], 0, 0
        for k, (name, op, inputs) in enumerate(nodes, m):
            call = op == "call_function"
            if call:
                for s in copies.get(name, info[name].storages):
                    if s not in static:
                        c = refs[s] if s in refs else st.count_before(s, m)
                        live += sizes[s] if c == 0 else 0
                        refs[s] = c + 1
            level = live + (info[name].temp_bytes if call else 0)
            top = max(top, level + offset)
            if stop_at is not None and top >= stop_at:
                return top, None
            # a value whose last reader is in the window dies at its last reader here
            dead = [a for a in set(inputs) if last[a] == k and base_last[a] <= M and a not in outputs]
            if name not in base_last and name not in outputs and (call or backward):
                dead.append(name)
            for a in dead:
                for s in copies.get(a, info[a].storages):
                    if s not in static:
                        c = (refs[s] if s in refs else st.count_before(s, m)) - 1
                        live -= sizes[s] if c == 0 else 0
                        refs[s] = c
        return top, st.static_bytes + level

    def _index_writes(self) -> None:
        """Where each storage is last used in the graph (by a node or as an input), and
        the nodes that may write into an input (:func:`~planner.reuse.plan_reuse`'s
        candidates, a superset: its other conditions do not depend on the order)."""
        nodes = self.plain.nodes
        both = {n for n, _, _ in self.schedule.forward.nodes} & {n for n, _, _ in self.schedule.backward.nodes}
        targets = {n.name: n.target for n in self.plain.gm.graph.nodes if n.op == "call_function"}
        self.storage_last: dict[int, int] = {}
        self.writers: set[str] = set()
        for k, (n, op, inputs) in enumerate(self.order.nodes):
            for a in (n, *inputs):
                for s in nodes[a].storages:
                    self.storage_last[s] = k
            if (op == "call_function" and n not in both and len(nodes[n].storages) == 1
                    and out_variant(targets.get(n)) is not None):
                self.writers.add(n)

    def _same_writes(self, nodes, m: int, M: int, i: int, j: int) -> bool:
        """Whether the moved order has the same writes into inputs as the schedule:
        every writer in the window sees each input's storage last used at itself
        exactly when it does in the schedule, or, failing that, planning the writes
        for the moved schedule gives the same."""
        info, base_last = self.plain.nodes, self.storage_last
        last: dict[int, int] = {}
        for k, (n, _, inputs) in enumerate(nodes, m):
            for a in (n, *inputs):
                for s in info[a].storages:
                    if m <= base_last[s] <= M:
                        last[s] = k
        old = {n: k for k, (n, _, _) in enumerate(self.order.nodes[m:M + 1], m)}
        for k, (n, _, inputs) in enumerate(nodes, m):
            if n not in self.writers:
                continue
            for a in inputs:
                sts = info[a].storages
                if len(sts) == 1 and (last.get(sts[0], base_last[sts[0]]) == k) != (base_last[sts[0]] == old[n]):
                    return self._replanned_writes_same(i, j)
        return True

    def _replanned_writes_same(self, i: int, j: int) -> bool:
        cand = replace(self.schedule, **{self.graph: moved(self.order, i, j)})
        rw = plan_reuse(self.plain, cand, memo=self.memo)
        base = self.reuse
        return rw.forward == base.forward and rw.backward == base.backward and rw.storage_map == base.storage_map
