"""Exact liveness simulation of one training step: forward graph, then backward graph.

Storage-level accounting in the order the runtime runs the nodes: a node's new
storages are allocated when it runs; a storage is freed once no live value refers
to it (fx frees each value after its last use, and the boxed calling convention
frees graph inputs too). Parameters, buffers and inputs are live throughout; the
model's outputs are held by the caller until backward ends; gradients are kept.
Under ``torch.distributed`` the engine's per-rank bytes (``planner.distributed``)
are added to every point of forward and of backward, and to the level at the end
of backward while gradients are reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from profiles.graph_profile import GraphProfile

from .distributed import EngineBytes
from .schedule import GraphOrder, Schedule

__all__ = ["SimResult", "simulate", "TimelinePoint", "held_tangents", "END_OF_BACKWARD"]


@dataclass(frozen=True)
class TimelinePoint:
    """Live bytes just after ``node`` ran (its inputs not yet freed)."""

    phase: str
    node: str
    live_bytes: int


@dataclass
class SimResult:
    peak_bytes: int
    #: Node at which the peak is reached, and its phase.
    peak_node: str
    peak_phase: str
    #: Bytes of parameters, buffers and inputs (live for the whole step).
    static_bytes: int
    timeline: list[TimelinePoint] = field(default_factory=list)
    #: Storage ids live at the peak (besides parameters, buffers and inputs).
    peak_storages: tuple[int, ...] = ()


#: ``SimResult.peak_node`` when the peak is the gradient reduction after backward.
END_OF_BACKWARD = "(end of backward: gradient reduction)"


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


def _round(nbytes: int, granularity: int) -> int:
    if granularity <= 1:
        return nbytes
    return (nbytes + granularity - 1) // granularity * granularity


def simulate(
    gp: GraphProfile,
    schedule: Schedule,
    *,
    granularity: int = 1,
    timeline: bool = False,
    engine: EngineBytes | None = None,
) -> SimResult:
    """Simulate the step and return its peak of live bytes (per rank with ``engine``)."""
    sizes = [_round(b, granularity) for b in gp.storage_bytes]
    info = gp.nodes
    refs: dict[int, int] = {}
    live = 0
    static = set(gp.static_storages)
    static_bytes = sum(sizes[s] for s in static)
    peak, peak_node, peak_phase = 0, "", ""
    points: list[TimelinePoint] = []
    peak_live: list[int] = []
    extra = {"forward": engine.forward if engine else 0, "backward": engine.backward if engine else 0}
    level = 0  # the single model's live bytes at the last node run, its temporaries included

    def acquire(storages):
        nonlocal live
        for s in storages:
            if s in static:
                continue
            if refs.get(s, 0) == 0:
                live += sizes[s]
            refs[s] = refs.get(s, 0) + 1

    def release(storages):
        nonlocal live
        for s in storages:
            if s in static:
                continue
            refs[s] -= 1
            if refs[s] == 0:
                live -= sizes[s]

    def run(order: GraphOrder, phase: str):
        nonlocal peak, peak_node, peak_phase, level
        last_use: dict[str, int] = {}
        for i, (_, _, inputs) in enumerate(order.nodes):
            for a in inputs:
                last_use[a] = i
        outputs = set(order.outputs)
        for i, (name, op, inputs) in enumerate(order.nodes):
            if op == "call_function":
                acquire(info[name].storages)
            level = static_bytes + live + (info[name].temp_bytes if op == "call_function" else 0)
            total = level + extra[phase]
            if timeline:
                points.append(TimelinePoint(phase, name, total))
            if total > peak:
                peak, peak_node, peak_phase = total, name, phase
                peak_live[:] = [k for k, c in refs.items() if c > 0]
            # free what is dead after this node
            for a in set(inputs):
                if last_use.get(a) == i and a not in outputs:
                    release(info[a].storages)
            if name not in last_use and name not in outputs:
                if op == "call_function" or phase == "backward":
                    release(info[name].storages)
        return list(order.outputs)

    # Forward: placeholders are primals (static).
    fwd_out = run(schedule.forward, "forward")
    user_outputs = fwd_out[: gp.joint.num_fwd_outputs]
    saved = list(schedule.saved)
    # The caller holds the model's outputs until the step ends; autograd's
    # context holds the saved values until backward's last use frees them.
    for name in set(user_outputs):
        acquire(info[name].storages)
    for name in saved:
        acquire(info[name].storages)
    for name in set(fwd_out):
        release(info[name].storages)
    # Tangents (gradients of the outputs) are allocated before backward runs; the
    # loss's seed gradient is held by the caller until backward returns.
    seeds = held_tangents(gp)
    for name, op, _ in schedule.backward.nodes:
        if op == "placeholder" and name.startswith("tangents"):
            acquire(info[name].storages)
            if name in seeds:
                acquire(info[name].storages)
    run(schedule.backward, "backward")
    if engine is not None and level + engine.end > peak:
        peak, peak_node, peak_phase = level + engine.end, END_OF_BACKWARD, "backward"
        peak_live[:] = [k for k, c in refs.items() if c > 0]
    return SimResult(peak, peak_node, peak_phase, static_bytes, points, tuple(sorted(peak_live)))
