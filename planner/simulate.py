"""Exact liveness simulation of one training step: forward graph, then backward graph.

Storage-level accounting in the order the runtime runs the nodes: a node's new
storages are allocated when it runs; a storage is freed once no live value refers
to it (fx frees each value after its last use, and the boxed calling convention
frees graph inputs too). Parameters, buffers and inputs are live throughout; the
model's outputs are held by the caller until backward ends; gradients are kept.
Under ``torch.distributed`` the engine's per-rank bytes (``planner.distributed``)
are added to every point of forward and of backward, and to the level at the end
of backward while gradients are reduced. The training loop around the step
(:mod:`planner.training_loop`: the loss outside the model, held gradients, the
optimizer) adds the points of phase ``"loss"`` between forward and backward and
one of phase ``"optimizer"`` (``opt.step()``) after backward. A plan compiled by
Inductor with channels-last layouts (``engine.layout``) adds the layout copies
as they live, and runs each graph as Inductor does (:mod:`planner.inductor_fusion`):
a pointwise value read by one kernel is not allocated, a kernel may write over
an input that dies at it.
"""

from __future__ import annotations

from dataclasses import dataclass

from profiles.allocator import round_bytes
from profiles.graph_profile import GraphProfile

from .distributed import EngineBytes
from .inductor_fusion import fused_graph, writes_over_input
from .recomputed_copies import recomputed_copies
from .schedule import GraphOrder, Schedule
from .training_loop import TrainingLoop

__all__ = ["SimResult", "simulate", "TimelinePoint", "held_tangents", "END_OF_BACKWARD", "OPTIMIZER_STEP"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TimelinePoint:
    """Live bytes just after ``node`` ran (its inputs not yet freed)."""

    #: ``"forward"``, ``"loss"``, ``"backward"`` or ``"optimizer"``.
    phase: str
    #: The node that ran.
    node: str
    #: Bytes live then, its temporaries included.
    live_bytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SimResult:
    """The peak of a simulated step."""

    #: The most bytes live at any point of the step.
    peak_bytes: int
    #: Node at which the peak is reached (:data:`END_OF_BACKWARD` for the gradient reduction).
    peak_node: str
    #: Phase of ``peak_node``: ``"forward"``, ``"loss"``, ``"backward"`` or ``"optimizer"``.
    peak_phase: str
    #: Bytes of parameters, buffers and inputs (live for the whole step).
    static_bytes: int
    #: Live bytes after each node, when asked for (``simulate(..., timeline=True)``).
    timeline: tuple[TimelinePoint, ...] = ()
    #: Storage ids live at the peak besides parameters, buffers and inputs, when asked
    #: for (``simulate(..., track_peak=True)``: what :func:`planner.order.improve_order`
    #: tries to free or delay there).
    peak_storages: frozenset[int] = frozenset()


#: ``SimResult.peak_node`` when the peak is the gradient reduction after backward.
END_OF_BACKWARD = "(end of backward: gradient reduction)"
#: ``SimResult.peak_node`` (phase ``"optimizer"``) when the peak is ``opt.step()``.
OPTIMIZER_STEP = "(opt.step())"


def loss_read_outputs(gp: GraphProfile, fwd_out) -> frozenset[str]:
    """The forward outputs (names, from ``fwd_out``: the outputs in the joint graph's
    order) that only a loss computed eagerly after the last region holds
    (``JointGraph.loss_read_outputs``), not also another output the caller holds."""
    n = gp.joint.num_fwd_outputs
    read = set(gp.joint.loss_read_outputs)
    if not read:
        return frozenset()
    return frozenset(fwd_out[i] for i in read) - {fwd_out[i] for i in range(n) if i not in read}


def held_tangents(gp: GraphProfile) -> frozenset[str]:
    """Tangents held until backward returns rather than freed after their last use.

    A one-element tangent is the gradient ``loss.backward()`` starts from (a ones
    tensor made by ``torch.autograd.backward``, which keeps it until backward
    returns), or one passed on unchanged from it. Other tangents reach the compiled
    backward in the list it empties as it goes, and die after their last use.
    """
    held = set()
    for n in gp.gm.graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if n.name.startswith("tangents") and hasattr(val, "numel") and val.numel() == 1:
            held.add(n.name)
    return frozenset(held)


class _Stopped(Exception):
    """Raised inside a simulation when a point reaches its ``stop_at`` bytes."""


class _Liveness:
    """The simulation's state: reference counts of live storages, the live bytes,
    and the peak so far."""

    def __init__(self, gp: GraphProfile, granularity: int, engine: EngineBytes | None, timeline: bool, held: int,
                 track: bool = False, stop_at: int | None = None):
        self.info = gp.nodes
        self.sizes = [round_bytes(b, granularity) for b in gp.storage_bytes]
        self.static = set(gp.static_storages)
        self.static_bytes = sum(self.sizes[s] for s in self.static)
        self.refs: dict[int, int] = {}
        self.live = 0
        #: The single model's live bytes at the last node run, its temporaries included.
        self.level = 0
        #: Per phase, bytes beyond the model's step: the engine's, and what the loop holds all step.
        self.extra = {"forward": held + (engine.forward if engine else 0), "backward": held + (engine.backward if engine else 0)}
        # the loss runs after forward returns: FSDP2's root has freed its all-gather output then
        self.extra["loss"] = self.extra["backward"]
        #: Per-block FSDP2's bytes along the step (planner.fsdp_blocks), and at the node being run:
        #: its bytes beyond ``extra``, and the level of the moment just before it (0: none).
        self.blocks = engine.blocks if engine is not None else None
        #: Inductor's channels-last copies (planner.layout_copies), and whether graphs run fused.
        self.layout = engine.layout if engine is not None else None
        if self.layout is not None:
            self.extra["loss"] += self.layout.held
        self.delta = self.floor = 0
        self.peak, self.peak_node, self.peak_phase = 0, "", ""
        self.peak_storages: frozenset[int] = frozenset()
        #: Whether ``peak_storages`` is recorded at each new peak.
        self.track = track
        #: Bytes at which the simulation stops (None: it runs to the end).
        self.stop_at = stop_at
        self.points: list[TimelinePoint] | None = [] if timeline else None
        #: The last graph's nodes whose storages are recomputed copies (:mod:`planner.recomputed_copies`),
        #: and the forward storage each copy's id stands for.
        self.copies: dict[str, tuple[int, ...]] = {}
        self.origin: dict[int, int] = {}

    def acquire(self, storages) -> None:
        for s in storages:
            if s in self.static:
                continue
            if self.refs.get(s, 0) == 0:
                self.live += self.sizes[s]
            self.refs[s] = self.refs.get(s, 0) + 1

    def release(self, storages) -> None:
        for s in storages:
            if s in self.static:
                continue
            self.refs[s] -= 1
            if self.refs[s] == 0:
                self.live -= self.sizes[s]

    def record(self, name: str, phase: str, temp_bytes: int) -> None:
        """The level just after ``name`` ran; a new peak when above the last."""
        self.level = self.static_bytes + self.live + temp_bytes
        self.point(name, phase, max(self.level + self.extra[phase] + self.delta, self.floor))

    def point(self, name: str, phase: str, total: int) -> None:
        """``total`` bytes live at ``name``; a new peak when above the last."""
        if self.points is not None:
            self.points.append(TimelinePoint(phase=phase, node=name, live_bytes=total))
        if total > self.peak:
            self.peak, self.peak_node, self.peak_phase = total, name, phase
            if self.track:
                self.peak_storages = self.live_storages()
            if self.stop_at is not None and total >= self.stop_at:
                raise _Stopped()

    def live_storages(self) -> frozenset[int]:
        """Storage ids live now besides parameters, buffers and inputs (a recomputed
        copy as the id of the storage it copies)."""
        return frozenset(self.origin.get(s, s) for s, c in self.refs.items() if c > 0)

    def run(self, order: GraphOrder, phase: str) -> list[str]:
        """Run one graph: allocate each node's storages, free each value after its
        last use (graph inputs too in backward). Returns the graph's outputs."""
        info = self.info
        inlined: frozenset[str] = frozenset()
        if self.layout is not None:
            fused = fused_graph(info, order)
            inlined = fused.inlined
            order = GraphOrder(nodes=tuple((n, op, fused.inputs[n]) for n, op, _ in order.nodes), outputs=order.outputs)
        copies = self.copies = (recomputed_copies(info, order, self.live_storages(), self.sizes, self.origin)
                                if phase == "backward" else {})
        last_use: dict[str, int] = {}
        for i, (_, _, inputs) in enumerate(order.nodes):
            for a in inputs:
                last_use[a] = i
        outputs = set(order.outputs)
        walk = self.blocks.walk(phase, [(n, op) for n, op, _ in order.nodes]) if self.blocks is not None else None
        layout = self.layout.along(phase, [n for n, _, _ in order.nodes]) if self.layout is not None else None
        for i, (name, op, inputs) in enumerate(order.nodes):
            if walk is not None:
                self.delta, entry = walk.enter(name, op)
                self.floor = 0 if entry is None else self.static_bytes + self.live + self.extra[phase] + entry
            if layout is not None:
                self.delta = (self.delta if walk is not None else 0) + layout[i]
            if name in inlined:
                continue
            dying = [a for a in dict.fromkeys(inputs) if last_use.get(a) == i and a not in outputs]
            if op == "call_function":
                mine = copies.get(name, info[name].storages)
                over = (writes_over_input(info, name, mine, [(a, copies.get(a, info[a].storages)) for a in dying],
                                          self.sizes, self.refs) if self.layout is not None else None)
                if over is not None:
                    self.release(copies.get(over, info[over].storages))
                    dying.remove(over)
                self.acquire(mine)
            self.record(name, phase, info[name].temp_bytes if op == "call_function" else 0)
            for a in dying:
                self.release(copies.get(a, info[a].storages))
            if name not in last_use and name not in outputs:
                if op == "call_function" or phase == "backward":
                    self.release(copies.get(name, info[name].storages))
        self.delta = self.floor = 0
        return list(order.outputs)


def simulate(
    gp: GraphProfile,
    schedule: Schedule,
    *,
    granularity: int = 1,
    timeline: bool = False,
    track_peak: bool = False,
    stop_at: int | None = None,
    engine: EngineBytes | None = None,
    loop: TrainingLoop | None = None,
) -> SimResult:
    """Simulate the step and return its peak of live bytes (per rank with ``engine``;
    with the training loop's loss, held gradients and optimizer with ``loop``).
    With ``stop_at`` the simulation stops at the first point of at least that many
    bytes, whose bytes are then the result's ``peak_bytes`` (for a search that only
    asks whether a step stays below a level)."""
    loop = loop or TrainingLoop()
    state = _Liveness(gp, granularity, engine, timeline, loop.held_bytes, track_peak, stop_at)
    try:
        _run_step(state, gp, schedule, engine, loop)
    except _Stopped:
        pass
    return SimResult(
        peak_bytes=state.peak,
        peak_node=state.peak_node,
        peak_phase=state.peak_phase,
        static_bytes=state.static_bytes,
        timeline=tuple(state.points or ()),
        peak_storages=state.peak_storages,
    )


def _run_step(state: _Liveness, gp: GraphProfile, schedule: Schedule, engine: EngineBytes | None, loop: TrainingLoop) -> None:
    """Forward, the hand-over, backward, the gradient reduction and the optimizer step."""
    fwd_out = state.run(schedule.forward, "forward")
    _hand_over(state, gp, schedule, fwd_out, loop)
    bwd_out = state.run(schedule.backward, "backward")
    if engine is not None and state.level + loop.held_bytes + engine.end > state.peak:
        state.peak, state.peak_node, state.peak_phase = state.level + loop.held_bytes + engine.end, END_OF_BACKWARD, "backward"
        state.peak_storages = state.live_storages() if state.track else frozenset()
    if loop.has_optimizer:
        grads = {s for name in bwd_out for s in state.copies.get(name, state.info[name].storages)} - state.static
        level = state.static_bytes + state.live
        state.point(OPTIMIZER_STEP, "optimizer", loop.optimizer_peak(level, sum(state.sizes[s] for s in grads)))


def _hand_over(state: _Liveness, gp: GraphProfile, schedule: Schedule, fwd_out: list[str], loop: TrainingLoop) -> None:
    """Between the graphs: the caller holds the model's outputs until the step
    ends; autograd's context holds the saved values until backward's last use
    frees them; the loss outside the model runs on that level and ends with the
    gradients of the outputs; the tangents (gradients of the outputs) are allocated before
    backward runs, the loss's seed gradient held by the caller until backward returns."""
    info = gp.nodes
    for name in set(fwd_out[: gp.joint.num_fwd_outputs]):
        state.acquire(info[name].storages)
    for name in schedule.saved:
        state.acquire(info[name].storages)
    for name in set(fwd_out):
        state.release(info[name].storages)
    level = state.static_bytes + state.live + state.extra["loss"]
    for _, node, nbytes in loop.loss:
        state.point(node, "loss", level + nbytes)
    for name in loss_read_outputs(gp, fwd_out):  # the eager loss's backward has ended: it holds them no more
        state.release(info[name].storages)
    seeds = held_tangents(gp)
    for name, op, _ in schedule.backward.nodes:
        if op == "placeholder" and name.startswith("tangents"):
            state.acquire(info[name].storages)
            if name in seeds:
                state.acquire(info[name].storages)
