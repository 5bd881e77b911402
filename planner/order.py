"""Choose the order in which each graph of a split step runs its nodes, for memory.

Any topological order of a graph computes the same values; the order decides how
long each value is live. The partition emits forward and backward in the order
AOTAutograd traced them, which is the order eager PyTorch runs them (backward was
traced by running the autograd engine), with recomputed values just in time.
:func:`arrange` improves on it by local search under the exact simulator
(:func:`improve_order`): at the simulated peak, a node whose output is live there
but first read later sinks to just before its first reader, and a node after the
peak that frees a value live there rises to just after its inputs; the move that
lowers the step peak most is kept, until none does. So the result is never worse
than the partition's order. Each round simulates the schedule once and each move
only over the nodes it reorders (:mod:`planner.incremental`), which gives the
peaks a full simulation of each moved schedule gives. :func:`arrange` also lets ops write into inputs that
die at them (:mod:`planner.reuse`), judged together with the order.

:func:`greedy_order` is the list scheduling of Inductor's ``reorder_for_peak_memory``
("least peak memory first") on storages. It is kept for comparison: on transformer
backward graphs it runs small recomputations early and piles them up, and peaks
higher than the partition's order.

Constraints every order keeps: a node runs after its inputs; placeholders come
first; nodes whose re-execution would change results (random draws, RNG state
reads, in-place and effectful ops: ``NodeInfo.recomputable`` is False) keep their
relative order, so random numbers are drawn in the same sequence.
:func:`reorder_graph` puts an ``fx.GraphModule``'s nodes in a given order (what the
runtime would apply to the graphs it compiles).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.fx as fx

from profiles.graph_profile import GraphProfile

from .distributed import EngineBytes
from .incremental import MovePeaks, moved
from .schedule import GraphOrder, Schedule
from .reuse import Reuse, plan_reuse, profile_with_reuse
from .simulate import SimResult, held_tangents, simulate

__all__ = ["Arrangement", "arrange", "improve_order", "greedy_order", "greedy_schedule", "reorder_graph", "check_order"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Arrangement:
    """A schedule as :func:`arrange` leaves it, and what it started from."""

    #: The forward and backward node orders to run.
    schedule: Schedule
    #: Which nodes write into a dying input's buffer.
    reuse: Reuse
    #: The profile to simulate ``schedule`` with (``reuse`` applied).
    profile: GraphProfile
    #: Whether the forward and the backward order changed.
    reordered: tuple[bool, bool]
    #: The schedule as given, and the profile it was given with.
    given: Schedule
    given_profile: GraphProfile
    #: The simulation's allocation granularity and data-parallel engine bytes.
    granularity: int = 1
    engine: EngineBytes | None = None

    @property
    def before_bytes(self) -> int:
        """Simulated step peak of the schedule as given (bytes)."""
        return simulate(self.given_profile, self.given, granularity=self.granularity, engine=self.engine).peak_bytes

    @property
    def after_bytes(self) -> int:
        """Simulated step peak of the schedule as arranged (bytes)."""
        return simulate(self.profile, self.schedule, granularity=self.granularity, engine=self.engine).peak_bytes


def _round(nbytes: int, granularity: int) -> int:
    return nbytes if granularity <= 1 else (nbytes + granularity - 1) // granularity * granularity


def _ordered(gp: GraphProfile, order: GraphOrder) -> list[str]:
    """Nodes whose relative order is kept (random, RNG and effectful ops)."""
    return [n for n, op, _ in order.nodes if op == "call_function" and not gp.nodes[n].recomputable]


def _predecessors(gp: GraphProfile, order: GraphOrder) -> dict[str, set[str]]:
    names = {n for n, _, _ in order.nodes}
    preds = {n: {a for a in inputs if a in names} for n, _, inputs in order.nodes}
    chain = _ordered(gp, order)
    for a, b in zip(chain, chain[1:]):
        preds[b].add(a)
    return preds


def _freeing_sets(gp: GraphProfile, order: GraphOrder, never_freed: set[int]) -> dict[int, set[str]]:
    """For each storage the graph may free: the nodes that must all have run before
    it is free (every value referring to it, and every user of such a value)."""
    users: dict[str, set[str]] = {n: set() for n, _, _ in order.nodes}
    for n, _, inputs in order.nodes:
        for a in inputs:
            if a in users:
                users[a].add(n)
    pending: dict[int, set[str]] = {}
    for n, _, _ in order.nodes:
        for s in gp.nodes[n].storages:
            if s not in never_freed:
                pending.setdefault(s, set()).update({n} | users[n])
    return pending


def greedy_order(
    gp: GraphProfile,
    order: GraphOrder,
    *,
    live_at_start: set[int],
    never_freed: set[int],
    granularity: int = 1,
) -> GraphOrder:
    """A topological order of ``order``'s nodes chosen greedily for a low peak.

    At each step, among the nodes whose inputs have run: when some can run without
    raising the peak so far, the one leaving the fewest live bytes; otherwise the
    one that raises it least; ties in the original order. ``live_at_start``:
    storages live before the graph's first node; ``never_freed``: storages the graph
    does not free (parameters, outputs, held tangents)."""
    st = _Greedy(gp, order, live_at_start, never_freed, granularity)
    index = {n: i for i, (n, _, _) in enumerate(order.nodes)}
    by_name = {n: (n, op, inputs) for n, op, inputs in order.nodes}
    preds = _predecessors(gp, order)
    succs: dict[str, list[str]] = {n: [] for n in index}
    for n, ps in preds.items():
        for p in ps:
            succs[p].append(n)
    missing = {n: len(ps) for n, ps in preds.items()}
    ready = [n for n in index if missing[n] == 0]
    out: list[tuple[str, str, tuple[str, ...]]] = []
    while ready:
        best = min(ready, key=lambda n: (*st.key(n, by_name[n][1]), index[n]))
        ready.remove(best)
        out.append(by_name[best])
        st.run(best, by_name[best][1])
        for m in succs[best]:
            missing[m] -= 1
            if missing[m] == 0:
                ready.append(m)
    if len(out) != len(order.nodes):
        raise ValueError(f"the graph has a cycle through {sorted(set(index) - {n for n, _, _ in out})[:5]}")
    return GraphOrder(nodes=tuple(out), outputs=order.outputs)


class _Greedy:
    """The greedy's bookkeeping: live storages, what each node would free."""

    def __init__(self, gp: GraphProfile, order: GraphOrder, live_at_start, never_freed, granularity: int):
        self.gp = gp
        self.size = [_round(b, granularity) for b in gp.storage_bytes]
        self.never_freed = set(never_freed)
        self.pending = _freeing_sets(gp, order, self.never_freed)
        self.touch: dict[str, list[int]] = {n: [] for n, _, _ in order.nodes}
        for s, who in self.pending.items():
            for n in who:
                self.touch[n].append(s)
        self.created = set(live_at_start)
        self.live = set(live_at_start) - self.never_freed
        self.to_free = {n: 0 for n, _, _ in order.nodes}
        for s, who in self.pending.items():
            if len(who) == 1 and s in self.live:
                self.to_free[next(iter(who))] += self.size[s]
        self.level = sum(self.size[s] for s in self.live)
        self.peak = self.level

    def key(self, n: str, op: str) -> tuple[int, int]:
        new = [s for s in self.gp.nodes[n].storages if s not in self.created and s not in self.never_freed]
        grow = sum(self.size[s] for s in new)
        during = grow + (self.gp.nodes[n].temp_bytes if op == "call_function" else 0)
        dead = sum(self.size[s] for s in new if self.pending.get(s) == {n})
        return (during if self.level + during > self.peak else 0, grow - dead - self.to_free[n])

    def run(self, n: str, op: str) -> None:
        for s in self.gp.nodes[n].storages:
            if s not in self.created:
                self.created.add(s)
                if s not in self.never_freed:
                    self.live.add(s)
                    self.level += self.size[s]
        temp = self.gp.nodes[n].temp_bytes if op == "call_function" else 0
        self.peak = max(self.peak, self.level + temp)
        for s in self.touch[n]:
            who = self.pending[s]
            who.discard(n)
            if not who:
                if s in self.live:
                    self.live.discard(s)
                    self.level -= self.size[s]
            elif len(who) == 1 and s in self.live:
                self.to_free[next(iter(who))] += self.size[s]


def _storages(gp: GraphProfile, names) -> set[int]:
    return {s for n in names for s in gp.nodes[n].storages}


def greedy_schedule(gp: GraphProfile, schedule: Schedule, *, granularity: int = 1) -> Schedule:
    """``schedule`` with both graphs in :func:`greedy_order`, each given what it
    holds on entry and never frees as :func:`planner.simulate.simulate` counts it."""
    static = set(gp.static_storages)
    nfo = gp.joint.num_fwd_outputs
    user_outputs = schedule.forward.outputs[:nfo]
    fwd = greedy_order(
        gp, schedule.forward, live_at_start=set(),
        never_freed=static | _storages(gp, schedule.forward.outputs), granularity=granularity,
    )
    placeholders = [n for n, op, _ in schedule.backward.nodes if op == "placeholder"]
    seeds = held_tangents(gp)
    bwd = greedy_order(
        gp, schedule.backward, live_at_start=_storages(gp, placeholders) - static,
        never_freed=static | _storages(gp, schedule.backward.outputs) | _storages(gp, user_outputs)
        | _storages(gp, [n for n in placeholders if n in seeds]),
        granularity=granularity,
    )
    return replace(schedule, forward=fwd, backward=bwd)


def _moves(gp: GraphProfile, order: GraphOrder, peak_node: str, peak_storages: set[int], limit: int) -> list[tuple[int, int]]:
    """Single-node moves that may lower a peak reached at ``peak_node``: a node
    before the peak whose output is live at it but first read after it sinks to just
    before its first reader; a node after the peak that reads a value live at it
    rises to just after its last input. The largest outputs first."""
    names = [n for n, _, _ in order.nodes]
    pos = {n: i for i, n in enumerate(names)}
    p = pos[peak_node]
    fixed = set(_ordered(gp, order))
    start = sum(op == "placeholder" for _, op, _ in order.nodes)  # placeholders stay first
    users: dict[str, list[int]] = {n: [] for n in names}
    for i, (_, _, inputs) in enumerate(order.nodes):
        for a in inputs:
            if a in users:
                users[a].append(i)
    moves = []
    for i, (n, op, inputs) in enumerate(order.nodes):
        if op != "call_function" or n in fixed:
            continue
        live = sum(gp.storage_bytes[s] for s in gp.nodes[n].storages if s in peak_storages)
        if i <= p and live and users[n] and min(users[n]) > p:
            moves.append((live, i, min(users[n]) - 1))
        read = sum(gp.storage_bytes[s] for a in inputs for s in gp.nodes[a].storages if s in peak_storages)
        first = max([start] + [pos[a] + 1 for a in inputs if a in pos])
        if i > p and read and first <= p:
            moves.append((read, i, first))
    moves.sort(key=lambda m: -m[0])
    return [(i, j) for _, i, j in moves[:limit]]


def improve_order(gp: GraphProfile, schedule: Schedule, *, reuse: bool = False, memo: dict | None = None,
                  granularity: int = 1, engine=None, rounds: int = 20, limit: int = 32,
                  incremental: bool = True) -> tuple[Schedule, SimResult]:
    """Local search from ``schedule``: each round makes the move (:func:`_moves`)
    that lowers the simulated step peak most (the first such in :func:`_moves`' order),
    until none does. With ``reuse`` each schedule is simulated with its ops writing
    into dying inputs (:func:`~planner.reuse.plan_reuse` on ``gp``, with its ``memo``).

    ``incremental``: each move's peak from one simulation per round
    (:class:`planner.incremental.MovePeaks`); otherwise each moved schedule is
    simulated in full. Both give the same result (``tests/test_order.py``)."""
    memo = {} if memo is None else memo

    def with_reuse(s: Schedule) -> tuple[Reuse | None, GraphProfile]:
        if not reuse:
            return None, gp
        rw = plan_reuse(gp, s, memo=memo)
        return rw, profile_with_reuse(gp, rw, memo=memo)

    def simulated(s: Schedule) -> tuple[SimResult, MovePeaks | None, GraphProfile]:
        writes, profile = with_reuse(s)
        if not incremental or (engine is not None and engine.blocks is not None):  # MovePeaks: per-phase bytes only
            return simulate(profile, s, granularity=granularity, engine=engine, track_peak=True), None, profile
        peaks = MovePeaks(gp, s, profile, reuse=writes, memo=memo, granularity=granularity, engine=engine)
        return peaks.result, peaks, profile

    best, peaks, profile = simulated(schedule)
    for _ in range(rounds):
        graph = "forward" if best.peak_phase == "forward" else "backward"
        order = getattr(schedule, graph)
        if best.peak_node not in {n for n, _, _ in order.nodes}:
            break  # the gradient reduction after backward: no order changes its level
        found: tuple[int, tuple[int, int] | None] = (best.peak_bytes, None)
        for i, j in _moves(profile, order, best.peak_node, set(best.peak_storages), limit):
            # stopped at the level to beat: a candidate that reaches it is no better
            peak = peaks.peak(graph, i, j, stop_at=found[0]) if peaks is not None else None
            if peak is None:
                cand = replace(schedule, **{graph: moved(order, i, j)})
                peak = simulate(with_reuse(cand)[1], cand, granularity=granularity, engine=engine, stop_at=found[0]).peak_bytes
            if peak < found[0]:
                found = (peak, (i, j))
        if found[1] is None:
            break
        schedule = replace(schedule, **{graph: moved(order, *found[1])})
        best, peaks, profile = simulated(schedule)
    return schedule, best


def _without_temps(gp: GraphProfile) -> GraphProfile:
    if not any(i.temp_bytes for i in gp.nodes.values()):
        return gp
    return replace(gp, nodes={n: replace(i, temp_bytes=0) if i.temp_bytes else i for n, i in gp.nodes.items()})


def arrange(gp: GraphProfile, schedule: Schedule, *, reuse: bool = True, reorder: bool = True,
            granularity: int = 1, engine=None, rounds: int = 20, incremental: bool = True) -> Arrangement:
    """``schedule`` with its graphs reordered (:func:`improve_order`) and, with
    ``reuse``, ops writing into dying inputs (:mod:`planner.reuse`).

    The choices ignore op temporaries, so the runtime, which has no measured
    temporaries, makes the same ones from the graphs alone; ``after_bytes`` is the
    exact simulation of the result, temporaries included (simulated when asked for). ``incremental``: as
    :func:`improve_order`'s (the same result either way)."""
    plain = _without_temps(gp)
    memo: dict = {}
    new = schedule
    if reorder:
        new, _ = improve_order(plain, schedule, reuse=reuse, memo=memo, granularity=granularity, engine=engine,
                               rounds=rounds, incremental=incremental)
        check_order(gp, schedule.forward, new.forward)
        check_order(gp, schedule.backward, new.backward)
    rw = plan_reuse(gp, new, memo=memo) if reuse else Reuse(forward={}, backward={}, storage_map={})
    profile = profile_with_reuse(gp, rw)  # its own node records: the memo holds the temporary-free ones
    return Arrangement(
        schedule=new, reuse=rw, profile=profile,
        reordered=(new.forward != schedule.forward, new.backward != schedule.backward),
        given=schedule, given_profile=gp, granularity=granularity, engine=engine,
    )


def check_order(gp: GraphProfile, original: GraphOrder, new: GraphOrder) -> None:
    """``ValueError`` unless ``new`` runs the same nodes as ``original`` in a valid
    order: inputs first, placeholders first, and the kept relative order of random,
    RNG and effectful ops."""
    if sorted(n for n, _, _ in new.nodes) != sorted(n for n, _, _ in original.nodes) or new.outputs != original.outputs:
        raise ValueError("the reordered graph runs other nodes or has other outputs than the original")
    pos = {n: i for i, (n, _, _) in enumerate(new.nodes)}
    seen_call = False
    for n, op, inputs in new.nodes:
        if op == "placeholder" and seen_call:
            raise ValueError(f"placeholder {n} comes after a computation; placeholders must come first")
        seen_call = seen_call or op != "placeholder"
        late = [a for a in inputs if a in pos and pos[a] > pos[n]]
        if late:
            raise ValueError(f"{n} runs before its input {late[0]}")
    if _ordered(gp, new) != _ordered(gp, original):
        raise ValueError("the reordered graph changes the order of random, RNG or effectful ops")


def reorder_graph(gm: fx.GraphModule, order: GraphOrder) -> fx.GraphModule:
    """``gm`` with its nodes in ``order`` (names as in ``order``), the output last."""
    nodes = {n.name: n for n in gm.graph.nodes}
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name, _, _ in order.nodes:
        env[nodes[name]] = new.node_copy(nodes[name], lambda x: env[x])
    out = next(n for n in gm.graph.nodes if n.op == "output")
    new.node_copy(out, lambda x: env[x])
    renamed = [n.name for n in new.nodes if n.op != "output" and n.name not in nodes]
    if renamed or len(env) != len(nodes) - 1:
        raise ValueError(f"the order does not name every node of the graph once ({renamed[:3]})")
    new.lint()
    return fx.GraphModule(gm, new)
