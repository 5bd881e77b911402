"""Compile a planned model with Inductor: the plan's split, Inductor's kernels.

``torch.compile(model, backend="inductor", options={"custom_partitioner_fn": ...})``
hands Inductor's joint graph (after its decompositions and joint-graph passes) to a
:class:`PlanPartitioner`, which splits it as the plan says (forward saves exactly
the plan's values, backward recomputes the rest); Inductor then generates fused
kernels for both graphs. Plans for this route are made on the same joint graph
(``planner.plan(..., executor="inductor")``), so node names agree, and the graph's
fingerprint is checked as on the op-by-op route.

Every compiled call runs in :func:`compiling`. AOTAutograd's cache of whole
compiled steps is bypassed: a hit there would skip the partitioner with its checks
and shape bookkeeping. Inductor's FX graph cache stays on: it is keyed by each
split graph, and by :meth:`PlanPartitioner.uuid`, which covers the plans in use
(fingerprint, recompute set, dropout mode) and the fusion rules. Those rules keep
recomputation where the plan puts it: Inductor fuses a recomputed op into the
kernels that consume it, not horizontally into an unrelated kernel that shares an
input (which would run it early and hold its outputs, above the simulated peak).

A plan whose graph convolves, run on the CPU, is compiled with the Inductor
options its predicted peak assumes (``Plan.inductor_options``, :func:`planned_options`;
:mod:`planner.inductor_layout`): with or without channels-last layouts, and a value
read by several kernels stored once.

Inference (``eval()`` or ``torch.no_grad()``) runs the model compiled by Inductor
with the options given and its own partition: there is no backward to plan for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from planner.inductor_layout import LAYOUT_OFF_OPTIONS, InductorLayoutWarning
from planner.plan_type import Plan
from planner.schedule import forward_node_names
from profiles.device import target_device_type
from profiles.inductor_conv import ops_convolve, unmodelled_options
from profiles._torch_private import (
    RECOMPUTED,
    CustomPartitionerFn,
    import_inductor_passes,
    no_aot_autograd_cache,
    recompute_where_planned,
)

__all__ = [
    "PlanPartitioner",
    "plans_key",
    "compile_planned",
    "planned_options",
    "compile_inference",
    "compiling",
    "FUSION_RULES",
]

#: Part of every cache key: the fusion rules :func:`compiling` sets (Inductor's cache
#: key does not see them), so graphs compiled under other rules are not served.
FUSION_RULES = "recompute-fused-into-consumers-only-v1"


class PlanPartitioner(CustomPartitionerFn):
    """Inductor's partitioner for a planned module: ``split(joint, joint_inputs,
    num_fwd_outputs=..., **kw)`` returns the forward and backward graphs; ``key()``
    identifies the decisions it applies (Inductor's cache key)."""

    def __init__(self, split: Callable, key: Callable[[], str]):
        self._split = split
        self._key = key

    def __call__(self, gm, joint_inputs, **kwargs):
        fwd, bwd = self._split(gm, joint_inputs, **kwargs)
        recomputed = forward_node_names(gm)
        for node in bwd.graph.nodes:
            if node.name in recomputed:
                node.meta[RECOMPUTED] = True
        return fwd, bwd

    def uuid(self) -> str:
        return self._key()

    # Inductor pickles its options, this partitioner included, into its cache key:
    # what identifies the partitioner there is its key, not the module it splits for.
    def __getstate__(self) -> dict:
        return {"key": self._key()}

    def __setstate__(self, state: dict) -> None:
        self._split = _unpickled_split
        self._key = _Key(state["key"])


class _Key:
    """A fixed key (a partitioner rebuilt from its pickled cache-key form)."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self) -> str:
        return self.key


def _unpickled_split(*args, **kwargs):
    raise RuntimeError("a PlanPartitioner rebuilt from its pickled cache key cannot split graphs; apply the plan again")


def plans_key(plans: Iterable[Plan]) -> str:
    """A digest of what splits a graph: each plan's fingerprint, recompute set and dropout mode."""
    h = hashlib.sha256()
    for p in plans:
        h.update(json.dumps([p.fingerprint, sorted(p.recomputed), p.dropout, p.executor]).encode())
    return f"checkpoint-planner:{FUSION_RULES}:" + h.hexdigest()[:24]


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def planned_options(model: nn.Module, plan: Plan, options: dict | None) -> dict | None:
    """The Inductor options ``plan``'s graphs are compiled with: ``plan.inductor_options``
    (what its predicted peak assumes), ``options`` winning. A plan that records none
    whose graph convolves (a convolution among its values, or a convolution module in
    ``model``) on the CPU (a meta-device model: on the plan's target), written before
    plans recorded them, gets :data:`planner.inductor_layout.LAYOUT_OFF_OPTIONS`. Warns
    (:class:`planner.InductorLayoutWarning`) when ``options`` undo them."""
    assumed = dict(plan.inductor_options)
    if not assumed:
        param = next(iter(model.parameters()), None)
        device_type = param.device.type if param is not None and param.device.type != "meta" else target_device_type(plan.target)
        convolves = ops_convolve(d.op for d in plan.nodes) or any(isinstance(m, _CONV_MODULES) for m in model.modules())
        assumed = dict(LAYOUT_OFF_OPTIONS) if convolves and device_type == "cpu" else {}
    given = options or {}
    undone = unmodelled_options(given, assumed)
    if undone:
        warnings.warn(
            f"compiling convolutions on the CPU with {', '.join(undone)}: this plan's predicted peak assumes "
            f"{', '.join(f'{k}={v!r}' for k, v in assumed.items())}; Inductor then keeps buffers the planner does "
            "not simulate (channels-last copies, values recomputed in each kernel that reads them), and the "
            "measured peak can exceed the budget; leave these options unset",
            InductorLayoutWarning,
            stacklevel=5,
        )
    return {**assumed, **given} if assumed or options is not None else None


def compile_planned(model: nn.Module, partitioner: PlanPartitioner, options: dict | None, plan: Plan):
    """``model`` compiled by Inductor (with ``options``, and what :func:`planned_options`
    adds for ``plan``) as one graph for static shapes, its joint graph split by ``partitioner``."""
    import_inductor_passes()
    opts = {**(planned_options(model, plan, options) or {}), "custom_partitioner_fn": partitioner}
    return torch.compile(model, backend="inductor", options=opts, fullgraph=True, dynamic=False)


def compiling():
    """Context for every call of a module from :func:`compile_planned`: AOTAutograd's
    cache bypassed (the partitioner always runs), the backward graph compiled with
    the forward graph, and recomputations fused only into their consumers, so they
    run where the plan puts them (:func:`profiles._torch_private.recompute_where_planned`)."""
    return _both(no_aot_autograd_cache(), recompute_where_planned())


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def compile_inference(model: nn.Module, options: dict | None):
    """``model`` compiled by Inductor with ``options`` and Inductor's own partition:
    what ``eval()`` and ``torch.no_grad()`` calls of an Inductor-planned module run."""
    import_inductor_passes()
    return torch.compile(model, backend="inductor", options=dict(options or {}))
