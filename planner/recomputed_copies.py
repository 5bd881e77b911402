"""Which values backward recomputes into a buffer of their own while forward's buffer is still live.

The profile names one storage per buffer of the joint graph, so a forward value
backward recomputes has the storage id of forward's copy. That is one buffer in
the step only when forward's copy is dead by then. When it is still live as
backward starts (a model output the caller holds, or a saved view of it), the
recomputation allocates a second buffer next to it: a layer norm whose output is
a model output, rerun in backward for the mean and rstd its backward reads.
:func:`recomputed_copies` gives each such backward node its storages with the
second buffer as a new id; the simulator (:mod:`planner.simulate`) charges it.
"""

from __future__ import annotations

from typing import Mapping

from profiles.graph_profile import NodeInfo

from .schedule import GraphOrder

__all__ = ["recomputed_copies"]


def recomputed_copies(info: Mapping[str, NodeInfo], order: GraphOrder, live: frozenset[int], sizes: list[int],
                      origin: dict[int, int]) -> dict[str, tuple[int, ...]]:
    """Storages of the backward graph ``order``'s nodes that refer to a recomputed
    buffer whose forward copy is in ``live`` (the storages live as backward starts),
    by node name; nodes left out refer to their profile's storages.

    A node whose output storage none of its inputs has allocates it: a new id, whose
    size is appended to ``sizes`` and whose forward id ``origin`` records. A node that
    takes a storage from an input (a view, a getitem, an alias) refers to what that
    input refers to."""
    out: dict[str, tuple[int, ...]] = {}
    for name, op, inputs in order.nodes:
        storages = info[name].storages
        if live.isdisjoint(storages) or op != "call_function":
            continue
        if out.keys().isdisjoint(inputs) and live.intersection(storages).issubset(
                [t for a in inputs for t in info[a].storages]):
            continue  # it takes every live storage from an input that is no copy
        from_inputs: dict[int, int] = {}
        for a in inputs:
            for s, t in zip(info[a].storages, out.get(a, info[a].storages)):
                from_inputs.setdefault(s, t)
        new = []
        for s in storages:
            if s in from_inputs:
                new.append(from_inputs[s])
            elif s in live:
                origin[len(sizes)] = s
                new.append(len(sizes))
                sizes.append(sizes[s])
            else:
                new.append(s)
        if tuple(new) != storages:
            out[name] = tuple(new)
    return out
