"""The planning problem: which forward values backward needs, what each costs, and
a linear memory model of the step for the solvers.

Decision units are forward nodes. A node that owns storage (a computed tensor, or
one output of a multi-output op) can be *saved* (kept from forward until
backward's last use) or *recomputed* (rebuilt just before backward needs it). A
view or alias owns nothing: it is always rebuilt from its base at no cost.
Parameters and inputs are always available. Random and effectful ops are never
recomputed. The model's outputs are held by the caller anyway, so saving them is
free.

The memory model (``rows``) is linear in the decisions and deliberately simple;
the solvers check each candidate with the exact simulator (:mod:`planner.simulate`).
"""

from __future__ import annotations

import math
import operator
import random
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from profiles.graph_profile import GraphProfile

from .distributed import EngineBytes
from .schedule import fast_schedule
from .simulate import SimResult, held_tangents, simulate

__all__ = ["Problem", "Evaluation", "build_problem", "OBJECTIVES", "rank_key"]

INF = math.inf


@dataclass
class Evaluation:
    """A recompute set, checked by the exact simulator."""

    recompute: frozenset[str]
    saved: list[str]
    #: Forward nodes that actually run again in backward.
    recomputed: list[str]
    sim: SimResult
    cost_s: float
    flops: int
    #: Backward graph's call_function nodes in run order, and each one's inputs.
    bwd_order: list[str] = field(default_factory=list)
    bwd_inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class Problem:
    gp: GraphProfile
    #: Forward call_function nodes in execution order.
    fwd: list[str]
    #: Backward call_function nodes in execution order (before recomputation).
    bwd: list[str]
    #: Per forward node: bytes it owns, recompute cost (s) and FLOPs.
    own_bytes: dict[str, int]
    cost: dict[str, float]
    flops: dict[str, int]
    #: Forward nodes that may be recomputed / may be saved.
    can_recompute: set[str]
    can_save: set[str]
    #: Saving is free for these (model outputs, held anyway).
    free_save: set[str]
    #: Forward nodes read directly by backward nodes.
    bwd_needs: set[str]
    #: Forward node -> forward (non-primal) input nodes.
    fwd_inputs: dict[str, list[str]]
    #: For tuple-producing ops: getitem children; for getitems: the parent.
    parent: dict[str, str]
    #: Memory model: constant bytes per row and the rows' coefficient matrices
    #: (rows x candidates) for "saved" and "recomputed".
    cand: list[str] = field(default_factory=list)
    row_const: np.ndarray | None = None
    row_save: np.ndarray | None = None
    row_recompute: np.ndarray | None = None
    row_names: list[str] = field(default_factory=list)
    granularity: int = 1
    #: What the solvers minimise: "time" (recompute seconds) or "flops" (recomputed
    #: FLOPs, then seconds).
    objective: str = "time"
    #: Per-rank bytes a data-parallel engine adds to each phase (None: one process).
    engine: EngineBytes | None = None
    #: When set, the ILP's objective weights are perturbed by a fixed pseudo-random
    #: amount (deterministic per seed): another path through near-ties.
    tie_break_seed: int | None = None
    #: Dense memory rows the ILP has needed so far (kept for later solves).
    ilp_rows: set[int] = field(default_factory=set)
    _cache: dict = field(default_factory=dict)

    # -- exact evaluation -------------------------------------------------
    def evaluate(self, recompute) -> Evaluation:
        """Split the joint graph for ``recompute`` and simulate it exactly."""
        key = frozenset(recompute)
        if key in self._cache:
            return self._cache[key]
        sched = fast_schedule(self.gp.joint, key)
        sim = simulate(self.gp, sched, granularity=self.granularity, engine=self.engine)
        calls = [n for n in sched.backward.nodes if n[1] == "call_function"]
        recomputed = [name for name, _, _ in calls if name in self.own_bytes]
        cost = sum(self.cost.get(n, 0.0) for n in recomputed)
        flops = sum(self.flops.get(n, 0) for n in recomputed)
        ev = Evaluation(
            key, list(sched.saved), recomputed, sim, cost, flops,
            bwd_order=[name for name, _, _ in calls],
            bwd_inputs={name: inputs for name, _, inputs in calls},
        )
        self._cache[key] = ev
        return ev

    def rank(self, ev: "Evaluation") -> tuple:
        """Sort key of a fitting plan under the objective: lower is better."""
        return rank_key(self.objective, flops=ev.flops, time_s=ev.cost_s)

    def weights(self) -> dict[str, float]:
        """The ILP's objective coefficient per forward node (normalised); each scaled
        by up to 5% when ``tie_break_seed`` is set (see :func:`planner.api._lowest`)."""
        total_time = sum(self.cost.values()) or 1.0
        w = {n: c / total_time for n, c in self.cost.items()}
        if self.objective == "flops":
            total_flops = sum(self.flops.values()) or 1
            w = {n: self.flops[n] / total_flops + 1e-3 * w[n] for n in w}
        if self.tie_break_seed is not None:
            rng = random.Random(self.tie_break_seed)
            w = {n: w[n] * (1 + 0.05 * rng.random()) for n in sorted(w)}
        return w

    def reset_intervals(self) -> None:
        """Forget refinements: back to the first estimates (for reproducible results)."""
        self._need, self._end = dict(self._initial[0]), dict(self._initial[1])
        _interval_rows(self)

    def refine(self, ev: "Evaluation") -> bool:
        """Replace interval estimates with the exact ones of ``ev``'s schedule:
        where each recomputed value is rebuilt and when each value is last read.
        Returns True when anything changed."""
        bpos = {n: i for i, n in enumerate(self.bwd)}
        order = ev.bwd_order
        # position in backward-node terms: a recomputed node runs just before the
        # next original backward node
        nxt = len(self.bwd) - 1
        slot = {}
        for name in reversed(order):
            if name in bpos:
                nxt = bpos[name]
            slot[name] = nxt
        last_read: dict[str, int] = {}
        for name in order:
            for a in ev.bwd_inputs.get(name, ()):
                for o in self._owner_of(a) | {a}:
                    last_read[o] = max(last_read.get(o, -1), slot[name])
        changed = False
        rec = set(ev.recomputed)
        for n in self.cand:
            if n in rec and n in slot:
                if self._need[n] != slot[n]:
                    self._need[n] = slot[n]
                    changed = True
            if n in last_read and (n in rec or n in ev.saved):
                if self._end[n] != last_read[n]:
                    self._end[n] = last_read[n]
                    changed = True
        if changed:
            _interval_rows(self)
        return changed

    def timeline(self, recompute) -> list[tuple[str, str, int]]:
        """Predicted live bytes after each node of forward then backward, as
        ``(phase, node, bytes)``, for ``recompute``."""
        # fast_schedule gives the node orders of the graphs split_joint builds
        # (tests/test_schedule.py), without building them.
        sim = simulate(self.gp, fast_schedule(self.gp.joint, frozenset(recompute)), granularity=self.granularity,
                       timeline=True, engine=self.engine)
        return [(p.phase, p.node, p.live_bytes) for p in sim.timeline]

    def model_peak(self, save: np.ndarray, rec: np.ndarray) -> float:
        """Peak of the linear memory model for 0/1 vectors over ``cand``."""
        vals = self.row_const + self.row_save @ save + self.row_recompute @ rec
        return float(vals.max())

    def decisions_of(self, ev: "Evaluation") -> tuple[frozenset[str], frozenset[str]]:
        """An evaluated plan in the ILP's variables: ``(recomputed, saved candidates)``.

        The runtime may hand backward a view of a saved value; the ILP has no
        variable for that (views own nothing), and writes it as the view rebuilt
        from its saved base, which costs the same memory and nothing to run."""
        fwd = set(self.own_bytes)
        saved_cands: set[str] = set()
        recomputed = {n for n in ev.recomputed if n in self.can_recompute}
        for x in ev.saved:
            if x not in fwd:
                continue  # parameters and inputs
            if x in self.can_save:
                saved_cands.add(x)
            else:
                saved_cands |= self._owner_of(x)
                if x in self.can_recompute:
                    recomputed.add(x)
        return frozenset(recomputed), frozenset(saved_cands & set(self.cand))

    def model_peak_of(self, ev: "Evaluation") -> float:
        """Peak of the linear memory model for an evaluated plan."""
        rec, saved = self.decisions_of(ev)
        sv = np.array([1.0 if n in saved else 0.0 for n in self.cand])
        rv = np.array([1.0 if n in rec else 0.0 for n in self.cand])
        return self.model_peak(sv, rv)


OBJECTIVES = ("time", "flops")


def rank_key(objective: str, *, flops: float, time_s: float) -> tuple:
    """Sort key of a plan's recompute FLOPs and time under ``objective``: lower is better."""
    return (flops, time_s) if objective == "flops" else (time_s, flops)


def build_problem(gp: GraphProfile, *, granularity: int = 1, objective: str = "time", engine: EngineBytes | None = None) -> Problem:
    gm = gp.gm
    info = gp.nodes
    nodes = list(gm.graph.nodes)
    fwd = [n.name for n in nodes if n.op == "call_function" and info[n.name].phase == "forward"]
    bwd = [n.name for n in nodes if n.op == "call_function" and info[n.name].phase == "backward"]
    fwd_set = set(fwd)
    by_name = {n.name: n for n in nodes}
    sizes = gp.storage_bytes

    # Which node created each storage.
    creator: dict[int, str] = {}
    for n in nodes:
        for s in info[n.name].storages:
            creator.setdefault(s, n.name)

    parent: dict[str, str] = {}
    own: dict[str, int] = {}
    for name in fwd:
        node = by_name[name]
        if node.target is operator.getitem:
            parent[name] = node.args[0].name
            owners = {name, parent[name]}
        elif any(u.target is operator.getitem for u in node.users):
            own[name] = 0  # a multi-output op: its getitems own the storages
            continue
        else:
            owners = {name}
        own[name] = sum(sizes[s] for s in set(info[name].storages) if creator[s] in owners)

    out_node = nodes[-1]
    fwd_outputs = [a for a in out_node.args[0][: gp.joint.num_fwd_outputs] if isinstance(a, fx.Node)]
    held_storages = {s for a in fwd_outputs for s in info[a.name].storages}

    can_recompute = {n for n in fwd if info[n].recomputable}
    can_save = {n for n in fwd if own[n] > 0}
    free_save = {n for n in can_save if set(info[n].storages) <= held_storages | gp.static_storages}

    fwd_inputs = {
        n: [a.name for a in by_name[n].all_input_nodes if a.name in fwd_set] for n in fwd
    }
    bwd_needs = set()
    for b in bwd:
        for a in by_name[b].all_input_nodes:
            if a.name in fwd_set:
                bwd_needs.add(a.name)

    # A multi-output op carries the cost, its getitems none; views cost nothing.
    cost = {n: 0.0 if n in parent else info[n].time_s for n in fwd}
    flops = {n: info[n].flops for n in fwd}

    prob = Problem(
        gp=gp,
        fwd=fwd,
        bwd=bwd,
        own_bytes=own,
        cost=cost,
        flops=flops,
        can_recompute=can_recompute,
        can_save=can_save,
        free_save=free_save,
        bwd_needs=bwd_needs,
        fwd_inputs=fwd_inputs,
        parent=parent,
        granularity=granularity,
        objective=objective,
        engine=engine,
    )
    _build_memory_rows(prob, by_name, held_storages, creator)
    return prob


def _round(b: int, g: int) -> int:
    return b if g <= 1 else (b + g - 1) // g * g


def _build_memory_rows(prob: Problem, by_name, held_storages, creator) -> None:
    """Linear memory model: one row per forward and backward step."""
    gp = prob.gp
    info = gp.nodes
    g = prob.granularity
    sizes = [_round(b, g) for b in gp.storage_bytes]
    static = gp.static_storages
    static_bytes = sum(sizes[s] for s in static)
    fwd, bwd = prob.fwd, prob.bwd
    fpos = {n: i for i, n in enumerate(fwd)}
    bpos = {n: i for i, n in enumerate(bwd)}
    cand = [n for n in fwd if n in prob.can_save and n not in prob.free_save]
    prob.cand = cand
    cidx = {n: i for i, n in enumerate(cand)}

    # Alias groups: a candidate's storages and the forward nodes that refer to them.
    cand_storages = {n: {s for s in info[n].storages if creator[s] in (n, prob.parent.get(n))} for n in cand}
    storage_owner = {s: n for n, ss in cand_storages.items() for s in ss}

    def owner_of(node_name: str) -> set[str]:
        return {storage_owner[s] for s in info[node_name].storages if s in storage_owner}

    # Forward: last forward use of each candidate's storage.
    nf = len(fwd)
    fwd_last = {n: fpos[n] for n in cand}
    for n in fwd:
        for a in by_name[n].all_input_nodes:
            for o in owner_of(a.name):
                fwd_last[o] = max(fwd_last[o], fpos[n])
        for o in owner_of(n):
            fwd_last[o] = max(fwd_last[o], fpos[n])

    # Backward: first/last direct use of each candidate's storage, and F (earliest
    # possible need, through recomputation of its forward users).
    nb = len(bwd)
    first = {n: INF for n in fwd}
    last = {n: -1 for n in fwd}
    for b in bwd:
        j = bpos[b]
        for a in by_name[b].all_input_nodes:
            if a.name in fpos:
                for o in owner_of(a.name) | {a.name}:
                    first[o] = min(first[o], j)
                    last[o] = max(last[o], j)
    users: dict[str, list[str]] = {n: [] for n in fwd}
    for n in fwd:
        for a in prob.fwd_inputs[n]:
            users[a].append(n)
    # First estimate of when a recomputed value is rebuilt: its own first use or
    # its direct users' (one hop); refined from exact schedules by ``refine``.
    need = dict(first)
    for n in fwd:
        for u in users[n]:
            need[n] = min(need[n], first[u])
    end = dict(last)
    for n in fwd:
        for u in users[n]:
            if need[u] < INF:
                end[n] = max(end[n], int(need[u]))
    for n in fwd:  # aliases: a view's needs are its base's
        for o in owner_of(n):
            if o != n:
                need[o] = min(need[o], need[n])
                end[o] = max(end[o], end[n])
    prob._need = {n: need[n] for n in cand}
    prob._end = {n: end[n] for n in cand}
    prob._initial = (dict(prob._need), dict(prob._end))
    prob._owner_of = owner_of

    # Constant memory per forward step: storages that live in forward regardless
    # (not candidates: views of params, tuples' unused outputs) plus candidates
    # while alive in forward.
    live_events = np.zeros(nf + 1)
    for n in cand:
        b = sum(sizes[s] for s in cand_storages[n])
        live_events[fpos[n]] += b
        live_events[fwd_last[n] + 1] -= b
    # Other forward allocations, storage by storage (a multi-output op's storages
    # belong to its getitems; counting them per node would count them twice, and
    # hold a BatchNorm output all step because its running statistics are held):
    # storages no candidate owns live from their creation to their last forward
    # reader, or to the end of the step when the caller holds them (outputs,
    # free-saved values).
    free_saved_storages = {s for n in prob.free_save for s in info[n].storages}
    other_first: dict[int, int] = {}
    other_last: dict[int, int] = {}
    for n in fwd:
        i = fpos[n]
        for s in info[n].storages:
            if s in static or s in storage_owner:
                continue
            if creator[s] == n or creator[s] == prob.parent.get(n):
                other_first.setdefault(s, i)
        for a in [by_name[n], *by_name[n].all_input_nodes]:
            for s in info[a.name].storages:
                if s in other_first:
                    other_last[s] = max(other_last.get(s, i), i)
    for s, i in other_first.items():
        live_events[i] += sizes[s]
        if s not in held_storages and s not in free_saved_storages:
            live_events[other_last[s] + 1] -= sizes[s]
    const_f = static_bytes + np.cumsum(live_events)[:nf] + np.array([info[n].temp_bytes for n in fwd], dtype=float)
    if prob.engine is not None:
        const_f = const_f + prob.engine.forward
    held_bytes = sum(sizes[s] for s in held_storages if s not in static)
    held_bytes += sum(
        sizes[s] for n in prob.free_save for s in info[n].storages if s not in held_storages and s not in static
    )

    # Backward constant memory: backward-created storages and tangents.
    bev = np.zeros(nb + 2)
    tangent_bytes = 0
    seeds = held_tangents(gp)
    for n in gp.gm.graph.find_nodes(op="placeholder"):
        if n.name.startswith("tangents"):
            tb = sum(sizes[s] for s in info[n.name].storages if s not in held_storages and s not in static)
            lastb = max((bpos[u.name] for u in n.users if u.name in bpos), default=-1)
            tangent_bytes += tb
            if n.name not in seeds:  # the loss's seed gradient lives until backward returns
                bev[lastb + 1] -= tb
    outputs = {a.name for a in by_name[list(by_name)[-1]].all_input_nodes} if by_name else set()
    bwd_storage_last: dict[int, int] = {}
    bwd_storage_first: dict[int, int] = {}
    for b in bwd:
        j = bpos[b]
        for s in info[b].storages:
            if creator[s] == b or creator[s] == prob.parent.get(b) or (creator[s] in bpos):
                if s in static or s in held_storages:
                    continue
                bwd_storage_first.setdefault(s, j)
                bwd_storage_last[s] = max(bwd_storage_last.get(s, j), j)
        for a in by_name[b].all_input_nodes:
            if a.name in bpos:
                for s in info[a.name].storages:
                    if s in bwd_storage_first:
                        bwd_storage_last[s] = max(bwd_storage_last[s], j)
    for b in outputs:
        if b in bpos:
            for s in info[b].storages:
                if s in bwd_storage_last:
                    bwd_storage_last[s] = nb
    for s, j0 in bwd_storage_first.items():
        bev[j0] += sizes[s]
        bev[bwd_storage_last[s] + 1] -= sizes[s]
    const_b = static_bytes + held_bytes + tangent_bytes + np.cumsum(bev)[:nb]
    const_b = const_b + np.array([info[n].temp_bytes for n in bwd], dtype=float)
    if prob.engine is not None:
        const_b = const_b + prob.engine.backward

    m = len(cand)
    cb = np.array([sum(sizes[s] for s in cand_storages[n]) for n in cand], dtype=float)
    # forward rows: candidate dead in forward but saved
    S_f = np.zeros((nf, m))
    for i, n in enumerate(cand):
        S_f[fwd_last[n] + 1 :, i] = cb[i]
    # Subtract the "live in forward" part from S_f? No: const_f counts candidates
    # while alive; S_f adds them after their last forward use when saved.
    R_f = np.zeros((nf, m))
    prob._cb = cb
    prob._nf = nf
    prob._nb = nb
    prob._S_f, prob._R_f = S_f, R_f
    prob.row_const = np.concatenate([const_f, const_b])
    prob.row_names = [f"forward:{n}" for n in fwd] + [f"backward:{n}" for n in bwd]
    _interval_rows(prob)


def _interval_rows(prob: Problem) -> None:
    """Backward rows from the current live-interval estimates."""
    m, nb = len(prob.cand), prob._nb
    S_b = np.zeros((nb, m))
    R_b = np.zeros((nb, m))
    for i, n in enumerate(prob.cand):
        e = prob._end[n]
        if e >= 0:
            S_b[: e + 1, i] = prob._cb[i]
            if prob._need[n] < INF and prob._need[n] <= e:
                R_b[int(prob._need[n]) : e + 1, i] = prob._cb[i]
    prob.row_save = np.concatenate([prob._S_f, S_b])
    prob.row_recompute = np.concatenate([prob._R_f, R_b])
