"""The planning problem: which forward values backward needs, what each costs, and
a linear memory model of the step for the solvers.

Decision units are forward nodes. A node that owns storage (a computed tensor, or
one output of a multi-output op) can be *saved* (kept from forward until
backward's last use) or *recomputed* (rebuilt just before backward needs it). A
view or alias owns nothing: it is always rebuilt from its base at no cost.
Parameters and inputs are always available. Random and effectful ops are never
recomputed. The model's outputs are held by the caller anyway, so saving them is
free.

The ILP's linear memory model (:mod:`planner.memory_model`) is built with the
problem; the solvers check each candidate with the exact simulator (:mod:`planner.simulate`).
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch.fx as fx

from profiles.graph_profile import GraphProfile

from .distributed import EngineBytes
from .evaluation import Evaluation
from .fsdp_blocks import recomputable_in_blocks
from .executor import recompute_costs
from .memory_model import MemoryModel, build_memory_model
from .order import arrange
from .joint_index import JointIndex, index_joint, indexed_schedule
from .schedule import Schedule
from .simulate import loss_read_outputs, simulate
from .training_loop import TrainingLoop

__all__ = ["Problem", "Evaluation", "build_problem", "OBJECTIVES", "rank_key"]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Problem:
    """One profiled step as the solvers see it. Derive variants with
    ``dataclasses.replace`` (e.g. another ``objective``)."""

    gp: GraphProfile
    #: Forward call_function nodes in execution order.
    fwd: tuple[str, ...]
    #: Backward call_function nodes in execution order (before recomputation).
    bwd: tuple[str, ...]
    #: Per forward node: bytes it owns, recompute cost (s) and FLOPs.
    own_bytes: Mapping[str, int]
    cost: Mapping[str, float]
    flops: Mapping[str, int]
    #: Forward nodes that may be recomputed / may be saved.
    can_recompute: frozenset[str]
    can_save: frozenset[str]
    #: Saving is free for these (model outputs, held anyway).
    free_save: frozenset[str]
    #: Forward nodes read directly by backward nodes.
    bwd_needs: frozenset[str]
    #: Forward node -> forward (non-primal) input nodes.
    fwd_inputs: Mapping[str, list[str]]
    #: For getitems: the multi-output node they take apart.
    parent: Mapping[str, str]
    #: The ILP's linear memory model with its first interval estimates.
    memory: MemoryModel
    #: The joint graph as arrays, from which each candidate's schedule is derived.
    index: JointIndex
    #: Bytes the allocator rounds each block up to (1: exact).
    granularity: int = 1
    #: What the solvers minimise: "time" (recompute seconds) or "flops" (recomputed
    #: FLOPs, then seconds).
    objective: str = "time"
    #: Per-rank bytes a data-parallel engine adds to each phase (None: one process).
    engine: EngineBytes | None = None
    #: The training loop around the step: the loss outside the model, held gradients,
    #: the optimizer (:mod:`planner.training_loop`; None: the model returns its loss,
    #: gradients start as None, no optimizer step).
    loop: TrainingLoop | None = None
    #: Whether each schedule is arranged for memory as the runtime runs it
    #: (reordered, buffers reused: :func:`planner.order.arrange`). The solvers search
    #: on the problem with ``arrange=False`` (:meth:`unarranged`: the graphs as split),
    #: and the plan they choose is evaluated arranged (:func:`planner.trim.as_run`).
    arrange: bool = True
    #: Evaluations by recompute set and ``arrange``, and arranged schedules: a memo,
    #: shared by the problems derived from this one (neither depends on the objective).
    evaluations: dict = field(default_factory=dict, repr=False)

    # -- exact evaluation -------------------------------------------------
    def evaluate(self, recompute) -> Evaluation:
        """Split the joint graph for ``recompute`` and simulate it exactly, arranged
        as the runtime runs it when ``self.arrange`` (:meth:`arranged`)."""
        key = frozenset(recompute)
        if (key, self.arrange) in self.evaluations:
            return self.evaluations[(key, self.arrange)]
        sched, profile = self.arranged(key)
        sim = simulate(profile, sched, granularity=self.granularity, engine=self.engine, loop=self.loop)
        calls = [n for n in sched.backward.nodes if n[1] == "call_function"]
        recomputed = tuple(name for name, _, _ in calls if name in self.own_bytes)
        ev = Evaluation(
            recompute=key,
            saved=tuple(sched.saved),
            recomputed=recomputed,
            sim=sim,
            cost_s=sum(self.cost.get(n, 0.0) for n in recomputed),
            flops=sum(self.flops.get(n, 0) for n in recomputed),
            bwd_order=tuple(name for name, _, _ in calls),
            bwd_inputs={name: inputs for name, _, inputs in calls},
        )
        self.evaluations[(key, self.arrange)] = ev
        return ev

    def unarranged(self) -> "Problem":
        """This problem with the split's graphs simulated as ``split_joint`` emits them
        (what the solvers search on: each evaluation is cheap, and arranging only
        lowers the peak of the graphs without op temporaries), sharing the evaluation memo."""
        return self if not self.arrange else replace(self, arrange=False)

    def arranged(self, recompute: frozenset[str]) -> tuple[Schedule, GraphProfile]:
        """The schedule the runtime runs for ``recompute`` and the profile to simulate
        it with: the split's node orders (:func:`~planner.joint_index.indexed_schedule`
        gives those of the graphs ``split_joint`` builds, without building them), arranged for memory by
        :func:`planner.order.arrange` when ``self.arrange``."""
        if not self.arrange:
            return indexed_schedule(self.index, recompute), self.gp
        key = ("arranged", frozenset(recompute))
        if key not in self.evaluations:
            sched = indexed_schedule(self.index, recompute)
            arr = arrange(self.gp, sched, granularity=self.granularity, engine=self.engine)
            self.evaluations[key] = (arr.schedule, arr.profile)
        return self.evaluations[key]

    def rank(self, ev: Evaluation) -> tuple:
        """Sort key of a fitting plan under the objective: lower is better."""
        return rank_key(self.objective, flops=ev.flops, time_s=ev.cost_s)

    def weights(self, tie_break_seed: int | None = None) -> dict[str, float]:
        """The ILP's objective coefficient per forward node (normalised). With
        ``tie_break_seed`` each is scaled by up to 5%, by a fixed pseudo-random
        amount per seed: another path through near-ties (:func:`planner.search.lowest_plan`)."""
        total_time = sum(self.cost.values()) or 1.0
        w = {n: c / total_time for n, c in self.cost.items()}
        if self.objective == "flops":
            total_flops = sum(self.flops.values()) or 1
            w = {n: self.flops[n] / total_flops + 1e-3 * w[n] for n in w}
        if tie_break_seed is not None:
            rng = random.Random(tie_break_seed)
            w = {n: w[n] * (1 + 0.05 * rng.random()) for n in sorted(w)}
        return w

    def timeline(self, recompute) -> list[tuple[str, str, int]]:
        """Predicted live bytes after each node of forward then backward, as
        ``(phase, node, bytes)``, for ``recompute``."""
        sched, profile = self.arranged(frozenset(recompute))
        sim = simulate(profile, sched, granularity=self.granularity, timeline=True, engine=self.engine, loop=self.loop)
        return [(p.phase, p.node, p.live_bytes) for p in sim.timeline]

    def decisions_of(self, ev: Evaluation) -> tuple[frozenset[str], frozenset[str]]:
        """An evaluated plan in the ILP's variables: ``(recomputed, saved candidates)``.

        The runtime may hand backward a view of a saved value; the ILP has no
        variable for that (views own nothing), and writes it as the view rebuilt
        from its saved base, which costs the same memory and nothing to run."""
        saved_cands: set[str] = set()
        recomputed = {n for n in ev.recomputed if n in self.can_recompute}
        for x in ev.saved:
            if x not in self.own_bytes:
                continue  # parameters and inputs
            if x in self.can_save:
                saved_cands.add(x)
            else:
                saved_cands |= self.memory.owners_of(x)
                if x in self.can_recompute:
                    recomputed.add(x)
        return frozenset(recomputed), frozenset(saved_cands & set(self.memory.candidates))

    def model_peak_of(self, ev: Evaluation, memory: MemoryModel | None = None) -> float:
        """Peak of the linear memory model (``memory``, default the first estimates) for an evaluated plan."""
        return (memory if memory is not None else self.memory).peak_of(*self.decisions_of(ev))


OBJECTIVES = ("time", "flops")


def rank_key(objective: str, *, flops: float, time_s: float) -> tuple:
    """Sort key of a plan's recompute FLOPs and time under ``objective``: lower is better."""
    return (flops, time_s) if objective == "flops" else (time_s, flops)


def build_problem(gp: GraphProfile, *, granularity: int = 1, objective: str = "time", engine: EngineBytes | None = None,
                  loop: TrainingLoop | None = None) -> Problem:
    """The planning problem of a profiled step; ``granularity``: the allocator's block
    size; ``loop``: the training loop around the step."""
    gm = gp.gm
    info = gp.nodes
    nodes = list(gm.graph.nodes)
    fwd = tuple(n.name for n in nodes if n.op == "call_function" and info[n.name].phase == "forward")
    bwd = tuple(n.name for n in nodes if n.op == "call_function" and info[n.name].phase == "backward")
    fwd_set = set(fwd)
    by_name = {n.name: n for n in nodes}
    creator: dict[int, str] = {}  # which node created each storage
    for n in nodes:
        for s in info[n.name].storages:
            creator.setdefault(s, n.name)
    parent, own = _ownership(gp, fwd, by_name, creator)
    outputs = nodes[-1].args[0][: gp.joint.num_fwd_outputs]
    released = loss_read_outputs(gp, [a.name if isinstance(a, fx.Node) else None for a in outputs])
    # held all step: the outputs the caller keeps (those only an eager loss reads die before backward)
    held_storages = frozenset(s for a in outputs if isinstance(a, fx.Node) and a.name not in released
                              for s in info[a.name].storages)
    can_save = frozenset(n for n in fwd if own[n] > 0)
    free_save = frozenset(n for n in can_save if set(info[n].storages) <= held_storages | gp.static_storages)
    fwd_inputs = {n: [a.name for a in by_name[n].all_input_nodes if a.name in fwd_set] for n in fwd}
    in_blocks = recomputable_in_blocks(engine.blocks, gm) if engine is not None and engine.blocks is not None else fwd_set
    memory = build_memory_model(
        gp, fwd=fwd, bwd=bwd, candidates=tuple(n for n in fwd if n in can_save and n not in free_save),
        parent=parent, fwd_inputs=fwd_inputs, free_save=free_save, creator=creator,
        held_storages=held_storages, granularity=granularity, engine=engine, loop=loop,
    )
    return Problem(
        gp=gp,
        fwd=fwd,
        bwd=bwd,
        own_bytes=own,
        # A multi-output op carries the cost, its getitems none; views cost nothing;
        # the executor's cost model (op by op, or fused by Inductor) prices the rest.
        cost=_costs(gp, fwd, parent),
        flops={n: info[n].flops for n in fwd},
        # per-block FSDP2 runs the code between blocks eagerly: only views (which own no bytes) recomputed there
        can_recompute=frozenset(n for n in fwd if info[n].recomputable and (own[n] == 0 or n in in_blocks)),
        can_save=can_save,
        free_save=free_save,
        bwd_needs=frozenset(a.name for b in bwd for a in by_name[b].all_input_nodes if a.name in fwd_set),
        fwd_inputs=fwd_inputs,
        parent=parent,
        memory=memory,
        index=index_joint(gp.joint),
        granularity=granularity,
        objective=objective,
        engine=engine,
        loop=loop,
        # Inductor orders and reuses buffers itself: the runtime arranges only what runs op by op
        # and a step run as regions (:mod:`profiles.regions`) or per block (per-block FSDP2) runs its graphs as split
        arrange=gp.joint.executor == "eager" and not gp.joint.regions and (engine is None or engine.blocks is None),
    )


def _costs(gp: GraphProfile, fwd, parent) -> dict[str, float]:
    costs = recompute_costs(gp)
    return {n: 0.0 if n in parent else costs[n] for n in fwd}


def _ownership(gp: GraphProfile, fwd, by_name, creator) -> tuple[dict[str, str], dict[str, int]]:
    """``(parent, own)``: each getitem's multi-output node, and the bytes each
    forward node owns (a multi-output op none: its getitems own the storages)."""
    info, sizes = gp.nodes, gp.storage_bytes
    parent: dict[str, str] = {}
    own: dict[str, int] = {}
    for name in fwd:
        node = by_name[name]
        if node.target is operator.getitem:
            parent[name] = node.args[0].name
            owners = {name, parent[name]}
        elif any(u.target is operator.getitem for u in node.users):
            own[name] = 0
            continue
        else:
            owners = {name}
        own[name] = sum(sizes[s] for s in set(info[name].storages) if creator[s] in owners)
    return parent, own
