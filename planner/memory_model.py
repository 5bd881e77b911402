"""The ILP's linear memory model of one training step, as an immutable record.

One row per forward node, then one per backward node: the bytes live just after
that node ran, as a constant (what lives whatever the decisions) plus, per
candidate (a forward value that owns storage and is not held anyway), its bytes
when it is saved and when it is recomputed. A saved candidate lives from its last
forward use to its last backward read; a recomputed one from when backward first
needs it to its last read. The training loop around the step
(:mod:`planner.training_loop`) adds its held bytes to every row, and rows after
the backward ones: the loss's peak (every saved candidate live) and ``opt.step()``'s
(no candidate live). Those backward intervals are estimates;
:func:`refine` replaces them with the exact ones of a simulated schedule and
returns a new model. The solvers check every candidate plan with the exact
simulator (:mod:`planner.simulate`), so the model only has to rank plans well.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch.fx as fx

from profiles.allocator import round_bytes
from profiles.graph_profile import GraphProfile

from .distributed import EngineBytes
from .fsdp_blocks import node_bytes
from .evaluation import Evaluation
from .simulate import held_tangents
from .training_loop import TrainingLoop

__all__ = ["MemoryModel", "build_memory_model", "refine"]

INF = math.inf


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class MemoryModel:
    """Bytes live after each node of the step, linear in the save/recompute decisions."""

    #: The ILP's candidates: forward values that own storage and may be saved at a
    #: cost, in forward order (the columns of ``save`` and ``recompute``).
    candidates: tuple[str, ...]
    #: Backward nodes in run order (the rows after the forward ones).
    backward: tuple[str, ...]
    #: Bytes of each candidate's storages, rounded to the allocator's blocks.
    candidate_bytes: np.ndarray
    #: Per row: bytes live whatever the decisions.
    const: np.ndarray
    #: Rows x candidates: bytes a saved candidate adds; the forward rows alone
    #: (``save_forward``) and the training loop's rows after backward
    #: (``save_loop``) do not depend on the backward intervals.
    save: np.ndarray
    save_forward: np.ndarray
    save_loop: np.ndarray
    #: Rows x candidates: bytes a recomputed candidate adds (backward rows only).
    recompute: np.ndarray
    #: Per candidate: the backward row from which it lives when recomputed (inf: never needed).
    need: Mapping[str, float]
    #: Per candidate: the last backward row that reads it (-1: none).
    end: Mapping[str, int]
    #: Per node of the joint graph: the candidates whose storages its outputs refer to
    #: (nodes that refer to none are left out).
    owners: Mapping[str, frozenset[str]]

    def owners_of(self, name: str) -> frozenset[str]:
        """The candidates whose storages node ``name``'s outputs refer to."""
        return self.owners.get(name, frozenset())

    def peak(self, save: np.ndarray, recompute: np.ndarray) -> float:
        """The model's peak for 0/1 vectors over ``candidates``."""
        return float((self.const + self.save @ save + self.recompute @ recompute).max())

    def peak_of(self, recomputed: frozenset[str], saved: frozenset[str]) -> float:
        """The model's peak when ``recomputed`` are recomputed and ``saved`` saved."""
        sv = np.array([1.0 if n in saved else 0.0 for n in self.candidates])
        rv = np.array([1.0 if n in recomputed else 0.0 for n in self.candidates])
        return self.peak(sv, rv)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Step:
    """What the builder reads of the profiled step, indexed."""

    info: Mapping
    by_name: Mapping[str, fx.Node]
    #: Bytes per storage id, rounded to the allocator's blocks.
    sizes: list[int]
    static: frozenset[int]
    static_bytes: int
    fwd: tuple[str, ...]
    bwd: tuple[str, ...]
    fpos: Mapping[str, int]
    bpos: Mapping[str, int]
    #: Storage id -> the node that created it.
    creator: Mapping[int, str]
    #: For getitems: the multi-output node they take apart.
    parent: Mapping[str, str]
    #: Storages the caller holds until the step ends (the model's outputs).
    held_storages: frozenset[int]


def build_memory_model(
    gp: GraphProfile,
    *,
    fwd: tuple[str, ...],
    bwd: tuple[str, ...],
    candidates: tuple[str, ...],
    parent: Mapping[str, str],
    fwd_inputs: Mapping[str, list[str]],
    free_save: frozenset[str],
    creator: Mapping[int, str],
    held_storages: frozenset[int],
    granularity: int,
    engine: EngineBytes | None,
    loop: TrainingLoop | None = None,
) -> MemoryModel:
    """The memory model of ``gp``'s step with first estimates of the backward
    intervals (``loop``: the training loop around it)."""
    sizes = [round_bytes(b, granularity) for b in gp.storage_bytes]
    static = frozenset(gp.static_storages)
    step = _Step(
        info=gp.nodes, by_name={n.name: n for n in gp.gm.graph.nodes}, sizes=sizes, static=static,
        static_bytes=sum(sizes[s] for s in static), fwd=fwd, bwd=bwd,
        fpos={n: i for i, n in enumerate(fwd)}, bpos={n: i for i, n in enumerate(bwd)},
        creator=creator, parent=parent, held_storages=held_storages,
    )
    cand_storages = {n: {s for s in step.info[n].storages if creator[s] in (n, parent.get(n))} for n in candidates}
    storage_owner = {s: n for n, ss in cand_storages.items() for s in ss}
    owners = {}
    for name, ni in step.info.items():
        o = frozenset(storage_owner[s] for s in ni.storages if s in storage_owner)
        if o:
            owners[name] = o
    fwd_last = _forward_last_use(step, candidates, owners)
    need, end = _first_intervals(step, candidates, owners, fwd_inputs)
    cand_bytes = np.array([sum(sizes[s] for s in cand_storages[n]) for n in candidates], dtype=float)
    const_f = _forward_constant(step, candidates, cand_storages, storage_owner, fwd_last, free_save)
    const_b = _backward_constant(step, free_save, held_tangents(gp))
    if engine is not None:
        const_f = const_f + engine.forward
        const_b = const_b + engine.backward
        if engine.blocks is not None:  # per-block FSDP2: what it holds at each node
            const_f = const_f + np.array(node_bytes(engine.blocks, fwd, "forward"), dtype=float)
            const_b = const_b + np.array(node_bytes(engine.blocks, bwd, "backward"), dtype=float)
        if engine.layout is not None:  # Inductor's channels-last copies, as they live
            const_f = const_f + np.array(engine.layout.along("forward", fwd), dtype=float)
            const_b = const_b + np.array(engine.layout.along("backward", bwd), dtype=float)
    const_l, save_loop = _loop_rows(step, loop or TrainingLoop(), engine, cand_bytes)
    # forward rows: a saved candidate stays live after its last forward use
    save_forward = np.zeros((len(fwd), len(candidates)))
    for i, n in enumerate(candidates):
        save_forward[fwd_last[n] + 1 :, i] = cand_bytes[i]
    save, recompute = _interval_rows(candidates, cand_bytes, save_forward, save_loop, need, end, len(bwd))
    return MemoryModel(
        candidates=candidates,
        backward=bwd,
        candidate_bytes=_frozen(cand_bytes),
        const=_frozen(np.concatenate([const_f, const_b, const_l]) + (loop.held_bytes if loop else 0)),
        save=save,
        save_forward=_frozen(save_forward),
        save_loop=_frozen(save_loop),
        recompute=recompute,
        need=types.MappingProxyType(need),
        end=types.MappingProxyType(end),
        owners=types.MappingProxyType(owners),
    )


def refine(model: MemoryModel, ev: Evaluation) -> MemoryModel:
    """``model`` with the backward intervals of the candidates ``ev`` saves or
    recomputes replaced by the exact ones of its schedule: where each recomputed
    value is rebuilt and when each value is last read. Returns ``model`` itself
    when nothing changes."""
    bpos = {n: i for i, n in enumerate(model.backward)}
    order = ev.bwd_order
    # position in backward-node terms: a recomputed node runs just before the
    # next original backward node
    nxt = len(model.backward) - 1
    slot = {}
    for name in reversed(order):
        if name in bpos:
            nxt = bpos[name]
        slot[name] = nxt
    last_read: dict[str, int] = {}
    for name in order:
        for a in ev.bwd_inputs.get(name, ()):
            for o in model.owners_of(a) | {a}:
                last_read[o] = max(last_read.get(o, -1), slot[name])
    need, end = dict(model.need), dict(model.end)
    changed = False
    rec = set(ev.recomputed)
    for n in model.candidates:
        if n in rec and n in slot and need[n] != slot[n]:
            need[n] = slot[n]
            changed = True
        if n in last_read and (n in rec or n in ev.saved) and end[n] != last_read[n]:
            end[n] = last_read[n]
            changed = True
    if not changed:
        return model
    save, recompute = _interval_rows(
        model.candidates, model.candidate_bytes, model.save_forward, model.save_loop, need, end, len(model.backward)
    )
    return dataclasses.replace(
        model, save=save, recompute=recompute, need=types.MappingProxyType(need), end=types.MappingProxyType(end)
    )


def _interval_rows(candidates, candidate_bytes, save_forward, save_loop, need, end,
                   num_backward) -> tuple[np.ndarray, np.ndarray]:
    """The ``save`` and ``recompute`` matrices: forward rows ``save_forward``, then
    ``num_backward`` backward rows from the intervals ``need`` and ``end``, then the
    training loop's rows ``save_loop`` (nothing recomputed there)."""
    save_b = np.zeros((num_backward, len(candidates)))
    rec_b = np.zeros((num_backward, len(candidates)))
    for i, n in enumerate(candidates):
        e = end[n]
        if e >= 0:
            save_b[: e + 1, i] = candidate_bytes[i]
            if need[n] < INF and need[n] <= e:
                rec_b[int(need[n]) : e + 1, i] = candidate_bytes[i]
    save = np.concatenate([save_forward, save_b, save_loop])
    recompute = np.concatenate([np.zeros_like(save_forward), rec_b, np.zeros_like(save_loop)])
    return _frozen(save), _frozen(recompute)


def _loop_rows(step: _Step, loop: TrainingLoop, engine: EngineBytes | None,
               candidate_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training loop's rows after the backward ones, ``(const, save)``: the
    loss's peak on the level forward leaves (every saved candidate live, none
    recomputed yet), and ``opt.step()``'s on the level backward ends at (every
    saved value freed; the outputs and the gradients); the loop's held bytes are
    added to every row by the caller."""
    held = sum(step.sizes[s] for s in step.held_storages if s not in step.static)
    const, save = [], []
    if loop.loss:
        engine_bytes = engine.backward if engine is not None else 0  # after forward: FSDP2's all-gather output freed
        if engine is not None and engine.layout is not None:
            engine_bytes += engine.layout.held
        const.append(step.static_bytes + held + engine_bytes + max(b for _, _, b in loop.loss))
        save.append(candidate_bytes)
    if loop.has_optimizer:
        outputs = {a.name for a in list(step.by_name.values())[-1].all_input_nodes}
        grads = {s for b in outputs if b in step.bpos for s in step.info[b].storages} - step.static - step.held_storages
        grad_bytes = sum(step.sizes[s] for s in grads)
        # optimizer_peak adds the held bytes; the caller adds them to every row
        const.append(loop.optimizer_peak(step.static_bytes + held + grad_bytes, grad_bytes) - loop.held_bytes)
        save.append(np.zeros_like(candidate_bytes))
    return np.array(const, dtype=float), np.array(save, dtype=float).reshape(len(save), len(candidate_bytes))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _forward_last_use(step: _Step, candidates, owners) -> dict[str, int]:
    """The last forward row that reads (or creates) each candidate's storage."""
    fpos = step.fpos
    fwd_last = {n: fpos[n] for n in candidates}
    for n in step.fwd:
        for a in step.by_name[n].all_input_nodes:
            for o in owners.get(a.name, ()):
                fwd_last[o] = max(fwd_last[o], fpos[n])
        for o in owners.get(n, ()):
            fwd_last[o] = max(fwd_last[o], fpos[n])
    return fwd_last


def _first_intervals(step: _Step, candidates, owners, fwd_inputs) -> tuple[dict[str, float], dict[str, int]]:
    """First estimates of each candidate's backward interval: ``need``, when a
    recomputed value is rebuilt (its own first backward use or its direct forward
    users' first use, one hop), and ``end``, its last backward read (or its users'
    rebuild)."""
    fwd, bpos = step.fwd, step.bpos
    first = {n: INF for n in fwd}
    last = {n: -1 for n in fwd}
    for b in step.bwd:
        j = bpos[b]
        for a in step.by_name[b].all_input_nodes:
            if a.name in step.fpos:
                for o in owners.get(a.name, frozenset()) | {a.name}:
                    first[o] = min(first[o], j)
                    last[o] = max(last[o], j)
    users: dict[str, list[str]] = {n: [] for n in fwd}
    for n in fwd:
        for a in fwd_inputs[n]:
            users[a].append(n)
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
        for o in owners.get(n, ()):
            if o != n:
                need[o] = min(need[o], need[n])
                end[o] = max(end[o], end[n])
    return {n: need[n] for n in candidates}, {n: end[n] for n in candidates}


def _forward_constant(step: _Step, candidates, cand_storages, storage_owner, fwd_last, free_save) -> np.ndarray:
    """Per forward row, the bytes live whatever the decisions: parameters, buffers
    and inputs, candidates while alive in forward, the other forward allocations
    and the op's temporaries."""
    sizes, info, fpos = step.sizes, step.info, step.fpos
    live_events = np.zeros(len(step.fwd) + 1)
    for n in candidates:
        b = sum(sizes[s] for s in cand_storages[n])
        live_events[fpos[n]] += b
        live_events[fwd_last[n] + 1] -= b
    # Other forward allocations, storage by storage (a multi-output op's storages
    # belong to its getitems; counting them per node would count them twice, and
    # hold a BatchNorm output all step because its running statistics are held):
    # storages no candidate owns live from their creation to their last forward
    # reader, or to the end of the step when the caller holds them (outputs,
    # free-saved values).
    free_saved_storages = {s for n in free_save for s in info[n].storages}
    other_first: dict[int, int] = {}
    other_last: dict[int, int] = {}
    for n in step.fwd:
        i = fpos[n]
        for s in info[n].storages:
            if s in step.static or s in storage_owner:
                continue
            if step.creator[s] == n or step.creator[s] == step.parent.get(n):
                other_first.setdefault(s, i)
        for a in [step.by_name[n], *step.by_name[n].all_input_nodes]:
            for s in info[a.name].storages:
                if s in other_first:
                    other_last[s] = max(other_last.get(s, i), i)
    for s, i in other_first.items():
        live_events[i] += sizes[s]
        if s not in step.held_storages and s not in free_saved_storages:
            live_events[other_last[s] + 1] -= sizes[s]
    temps = np.array([info[n].temp_bytes for n in step.fwd], dtype=float)
    return step.static_bytes + np.cumsum(live_events)[: len(step.fwd)] + temps


def _backward_constant(step: _Step, free_save, seeds: frozenset[str]) -> np.ndarray:
    """Per backward row, the bytes live whatever the decisions: parameters,
    buffers and inputs, what the caller holds, the tangents, backward's own
    allocations and the op's temporaries."""
    sizes, info, bpos, static, held = step.sizes, step.info, step.bpos, step.static, step.held_storages
    held_bytes = sum(sizes[s] for s in held if s not in static)
    held_bytes += sum(sizes[s] for n in free_save for s in info[n].storages if s not in held and s not in static)
    nb = len(step.bwd)
    bev = np.zeros(nb + 2)
    tangent_bytes = 0
    for n in step.by_name.values():
        if n.op == "placeholder" and n.name.startswith("tangents"):
            tb = sum(sizes[s] for s in info[n.name].storages if s not in held and s not in static)
            lastb = max((bpos[u.name] for u in n.users if u.name in bpos), default=-1)
            tangent_bytes += tb
            if n.name not in seeds:  # the loss's seed gradient lives until backward returns
                bev[lastb + 1] -= tb
    first, last = _backward_storage_spans(step)
    for s, j0 in first.items():
        bev[j0] += sizes[s]
        bev[last[s] + 1] -= sizes[s]
    const_b = step.static_bytes + held_bytes + tangent_bytes + np.cumsum(bev)[:nb]
    return const_b + np.array([info[n].temp_bytes for n in step.bwd], dtype=float)


def _backward_storage_spans(step: _Step) -> tuple[dict[int, int], dict[int, int]]:
    """First and last backward row of each storage backward creates (the gradients
    it returns live to the end)."""
    info, bpos, creator = step.info, step.bpos, step.creator
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for b in step.bwd:
        j = bpos[b]
        for s in info[b].storages:
            if creator[s] == b or creator[s] == step.parent.get(b) or (creator[s] in bpos):
                if s in step.static or s in step.held_storages:
                    continue
                first.setdefault(s, j)
                last[s] = max(last.get(s, j), j)
        for a in step.by_name[b].all_input_nodes:
            if a.name in bpos:
                for s in info[a.name].storages:
                    if s in first:
                        last[s] = max(last[s], j)
    outputs = {a.name for a in list(step.by_name.values())[-1].all_input_nodes} if step.by_name else set()
    for b in outputs:
        if b in bpos:
            for s in info[b].storages:
                if s in last:
                    last[s] = len(step.bwd)
    return first, last
