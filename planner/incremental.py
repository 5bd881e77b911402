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

from bisect import bisect_left, bisect_right
from dataclasses import replace

from profiles.graph_profile import GraphProfile

from .reuse import Reuse, out_variant, plan_reuse
from .schedule import GraphOrder, Schedule
from .simulate import END_OF_BACKWARD, SimResult, _Liveness, _run_step  # the simulator's own state and step, recorded
from .training_loop import TrainingLoop

__all__ = ["MovePeaks", "moved"]


def moved(order: GraphOrder, i: int, j: int) -> GraphOrder:
    """``order`` with the node at position ``i`` moved to position ``j``."""
    nodes = list(order.nodes)
    nodes.insert(j, nodes.pop(i))
    return GraphOrder(nodes=tuple(nodes), outputs=order.outputs)


#: Nodes between two snapshots of a graph's reference counts (:class:`_Graph`).
SNAPSHOT_EVERY = 128


class _Recording(_Liveness):
    """The simulator's state, recording for each graph every change of a storage's
    reference count, and the live bytes before each node."""

    def __init__(self, gp: GraphProfile, granularity: int, engine, held: int):
        super().__init__(gp, granularity, engine, False, held)
        #: Every point's bytes, in step order.
        self.totals: list[int] = []
        #: Where the peak so far was reached: in a graph (its record, and the changes
        #: recorded by then), or elsewhere (None, and the storages live there).
        self.peak_at: tuple[_Graph | None, int | frozenset[int]] = (None, frozenset())
        #: Per graph (its phase), what it recorded (:class:`_Graph`).
        self.graphs: dict[str, _Graph] = {}
        self.current: _Graph | None = None
        self._allocated = 0

    def run(self, order: GraphOrder, phase: str) -> list[str]:
        self.current = _Graph(first=len(self.totals))
        self.current.snapshot(self.refs)
        try:
            return super().run(order, phase)
        finally:
            self.current.copies, self.graphs[phase], self.current = self.copies, self.current, None

    def _log(self, g: _Graph, storages, stamp: int) -> None:
        refs = self.refs
        for s in storages:
            if s not in self.static:
                g.stamps.append(stamp)
                g.storages.append(s)
                g.counts.append(refs[s])

    def acquire(self, storages) -> None:
        g = self.current
        if g is None:
            return super().acquire(storages)
        before = self.live
        super().acquire(storages)
        self._allocated += self.live - before
        self._log(g, storages, 2 * len(g.live_before))

    def release(self, storages) -> None:
        super().release(storages)
        if self.current is not None:
            self._log(self.current, storages, 2 * len(self.current.live_before) - 1)

    def record(self, name: str, phase: str, temp_bytes: int) -> None:
        g = self.current
        if g is not None:
            g.live_before.append(self.live - self._allocated)
            self._allocated = 0
        super().record(name, phase, temp_bytes)
        if g is not None and len(g.live_before) % SNAPSHOT_EVERY == 0:
            g.snapshot(self.refs)  # before the releases of node c * SNAPSHOT_EVERY - 1

    def point(self, name: str, phase: str, total: int) -> None:
        self.totals.append(total)
        if total > self.peak:  # the live storages are taken once the peak is known (:meth:`live_at_peak`)
            g = self.current
            self.peak_at = (g, len(g.stamps)) if g is not None else (None, self.live_storages())
        super().point(name, phase, total)

    def live_at_peak(self) -> frozenset[int]:
        """The storages live at the step's peak, as ``simulate(..., track_peak=True)`` gives them."""
        if self.peak_node == END_OF_BACKWARD:
            return self.live_storages()  # the level after backward, which nothing after it changes
        g, at = self.peak_at
        if g is None:
            return at
        c = bisect_right(g.snapshot_at, at) - 1
        counts = dict(g.snapshots[c])
        for e in range(g.snapshot_at[c], at):
            counts[g.storages[e]] = g.counts[e]
        return frozenset(self.origin.get(s, s) for s, n in counts.items() if n > 0)


class _Graph:
    """What :class:`_Recording` recorded of one graph's run."""

    def __init__(self, *, first: int):
        #: Index of the graph's first point in the step's points.
        self.first = first
        #: Every change of a storage's count, in order: its stamp (2k: an allocation by
        #: node k; 2k + 1: a free after node k), the storage, the count after it.
        self.stamps: list[int] = []
        self.storages: list[int] = []
        self.counts: list[int] = []
        #: Snapshot ``c`` of the counts (those not 0): as the graph starts, then as node
        #: ``c * SNAPSHOT_EVERY - 1`` has allocated; the number of changes recorded by then.
        self.snapshots: list[dict[int, int]] = []
        self.snapshot_at: list[int] = []
        #: Live bytes (beyond static ones) before each node allocates.
        self.live_before: list[int] = []
        #: The graph's recomputed copies (:mod:`planner.recomputed_copies`).
        self.copies: dict[str, tuple[int, ...]] = {}

    def snapshot(self, refs: dict[int, int]) -> None:
        self.snapshots.append({s: c for s, c in refs.items() if c})
        self.snapshot_at.append(len(self.stamps))

    def counts_before(self, m: int) -> tuple[dict[int, int], dict[int, int]]:
        """The counts just before node ``m`` allocates: those changed since the last
        snapshot (a new dict), and that snapshot (storages in neither have none)."""
        c = m // SNAPSHOT_EVERY
        changed: dict[int, int] = {}
        stamps, storages, counts = self.stamps, self.storages, self.counts
        e, end = self.snapshot_at[c], 2 * m
        while e < len(stamps) and stamps[e] < end:
            changed[storages[e]] = counts[e]
            e += 1
        return changed, self.snapshots[c]


class MovePeaks:
    """A schedule simulated once (:attr:`result`), and the step peak with any one node
    of one of its graphs moved (:meth:`peak`).

    ``profile`` is the profile the schedule is simulated with: ``plain`` with
    ``reuse`` applied (:func:`~planner.reuse.profile_with_reuse`), or ``plain`` itself
    when ``reuse`` is None; ``memo`` is :func:`~planner.reuse.plan_reuse`'s for ``plain``.
    The step is simulated without a training loop around it, as
    :func:`planner.order.improve_order` simulates it."""

    def __init__(self, plain: GraphProfile, schedule: Schedule, profile: GraphProfile, *,
                 reuse: Reuse | None, memo: dict, granularity: int = 1, engine=None):
        self.plain, self.schedule, self.reuse, self.memo = plain, schedule, reuse, memo
        st = self.state = _Recording(profile, granularity, engine, 0)
        _run_step(st, profile, schedule, engine, TrainingLoop())
        #: The schedule's simulation, as ``simulate(profile, schedule, track_peak=True)`` gives it.
        self.result = SimResult(peak_bytes=st.peak, peak_node=st.peak_node, peak_phase=st.peak_phase,
                                static_bytes=st.static_bytes, peak_storages=st.live_at_peak())
        #: The gradient reduction's bytes beyond backward's last level (None without an engine),
        #: and the bytes of its point after the schedule's backward (0 without an engine).
        self.engine_end = engine.end if engine is not None else None
        self.end = st.level + engine.end if engine is not None else 0
        self._views: dict[str, _View] = {}

    def peak(self, graph: str, i: int, j: int, *, stop_at: int | None = None) -> int | None:
        """The step peak with node ``i`` of ``graph`` (``"forward"`` or ``"backward"``)
        moved to position ``j`` (with ``stop_at``: some point's bytes of at least
        ``stop_at`` when the peak reaches it), as :func:`~planner.simulate.simulate`
        gives it; None when the move changes which ops write into their inputs."""
        v = self._views.get(graph) or self._views.setdefault(graph, _View(self, graph))
        m, M = min(i, j), max(i, j)
        at_end = self.engine_end is not None and graph == "backward" and M == len(v.order.nodes) - 1
        bound = max(v.pre[m], v.post[M + 1], 0 if at_end else self.end)
        if stop_at is not None and bound >= stop_at:
            return bound
        if self.reuse is not None and not v.same_writes(i, j):
            return None
        nodes = list(v.order.nodes[m:M + 1])
        nodes.insert(j - m, nodes.pop(i - m))
        top, level = v.window(nodes, m, M, stop_at)
        return max(bound, top, level + self.engine_end if at_end and level is not None else 0)


def _new_position(p: int, i: int, j: int) -> int:
    """Position ``p`` of an order after the node at ``i`` moved to ``j``."""
    if p == i:
        return j
    if i < p <= j:
        return p - 1
    if j <= p < i:
        return p + 1
    return p


def _moved_last(uses: list[int], i: int, j: int) -> int:
    """The last of the increasing positions ``uses`` after the node at ``i`` moved to
    ``j`` (positions other than ``i`` keep their order)."""
    last = uses[-1] if uses[-1] != i else (uses[-2] if len(uses) > 1 else None)
    moved_last = _new_position(last, i, j) if last is not None else j
    k = bisect_left(uses, i)
    return max(moved_last, j) if k < len(uses) and uses[k] == i else moved_last


class _View:
    """One graph of a :class:`MovePeaks`: the most bytes before and after each node,
    each value's last reader, and where the graph's writes into inputs are decided."""

    def __init__(self, peaks: MovePeaks, graph: str):
        self.peaks, self.graph = peaks, graph
        st, self.order = peaks.state, getattr(peaks.schedule, graph)
        g = self.recorded = st.graphs[graph]
        n, totals = len(self.order.nodes), st.totals
        #: The most bytes of the step's points before node k, and from node k on.
        self.pre = [max(totals[:g.first], default=0)] * (n + 1)
        for k in range(1, n + 1):
            self.pre[k] = max(self.pre[k - 1], totals[g.first + k - 1])
        self.post = [max(totals[g.first + n:], default=0)] * (n + 1)
        for k in range(n - 1, -1, -1):
            self.post[k] = max(self.post[k + 1], totals[g.first + k])
        self.last_use: dict[str, int] = {}
        for k, (_, _, inputs) in enumerate(self.order.nodes):
            for a in inputs:
                self.last_use[a] = k
        self.outputs = set(self.order.outputs)
        if peaks.reuse is not None:
            self._index_writes()

    def window(self, nodes, m: int, M: int, stop_at: int | None) -> tuple[int, int | None]:
        """The most bytes of the points of ``nodes`` run at positions ``m`` to ``M``
        (or the first at least ``stop_at``), and the level at the last (None when stopped)."""
        st, g = self.peaks.state, self.recorded
        info, copies, sizes, static = st.info, g.copies, st.sizes, st.static
        base_last, outputs, backward = self.last_use, self.outputs, self.graph == "backward"
        offset = st.static_bytes + st.extra[self.graph]
        last: dict[str, int] = {}
        for k, (_, _, inputs) in enumerate(nodes, m):
            for a in inputs:
                last[a] = k
        refs, before = g.counts_before(m)
        live, top, level = g.live_before[m], 0, 0
        for k, (name, op, inputs) in enumerate(nodes, m):
            call = op == "call_function"
            if call:
                for s in copies.get(name, info[name].storages):
                    if s not in static:
                        c = refs[s] if s in refs else before.get(s, 0)
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
                        c = (refs[s] if s in refs else before.get(s, 0)) - 1
                        live -= sizes[s] if c == 0 else 0
                        refs[s] = c
        return top, st.static_bytes + level

    def _index_writes(self) -> None:
        """Where each storage is used (by a node or as an input), and the nodes that
        may write into an input with their inputs' storages (a superset of
        :func:`~planner.reuse.plan_reuse`'s: its other conditions do not depend on the order)."""
        sched, nodes = self.peaks.schedule, self.peaks.plain.nodes
        both = {n for n, _, _ in sched.forward.nodes} & {n for n, _, _ in sched.backward.nodes}
        targets = {n.name: n.target for n in self.peaks.plain.gm.graph.nodes if n.op == "call_function"}
        #: Per storage, the positions using it, in order.
        self.uses: dict[int, list[int]] = {}
        #: Positions of the possible writers, and the single storages of their inputs.
        self.writers: list[int] = []
        self.written: dict[int, list[int]] = {}
        for k, (n, op, inputs) in enumerate(self.order.nodes):
            for a in (n, *inputs):
                for s in nodes[a].storages:
                    uses = self.uses.setdefault(s, [])
                    if not uses or uses[-1] != k:
                        uses.append(k)
            if (op == "call_function" and n not in both and len(nodes[n].storages) == 1
                    and out_variant(targets.get(n)) is not None):
                self.writers.append(k)
                self.written[k] = [nodes[a].storages[0] for a in inputs if len(nodes[a].storages) == 1]

    def same_writes(self, i: int, j: int) -> bool:
        """Whether the order with node ``i`` moved to ``j`` has the schedule's writes
        into inputs: every writer between them sees each input's storage last used at
        itself exactly when it does in the schedule, or, failing that, planning the
        writes for the moved schedule gives the same."""
        m, M = min(i, j), max(i, j)
        for q in self.writers[bisect_left(self.writers, m):bisect_left(self.writers, M + 1)]:
            at = _new_position(q, i, j)
            for s in self.written[q]:
                uses = self.uses[s]
                if (_moved_last(uses, i, j) == at) != (uses[-1] == q):
                    return self._replanned_same(i, j)
        return True

    def _replanned_same(self, i: int, j: int) -> bool:
        peaks = self.peaks
        cand = replace(peaks.schedule, **{self.graph: moved(self.order, i, j)})
        rw = plan_reuse(peaks.plain, cand, memo=peaks.memo)
        return rw.forward == peaks.reuse.forward and rw.backward == peaks.reuse.backward \
            and rw.storage_map == peaks.reuse.storage_map
