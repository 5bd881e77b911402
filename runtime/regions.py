"""Run a plan whose step breaks the graph: each region split by its own decisions.

``torch.compile`` (without ``fullgraph``) compiles such a model as regions, in the
order the forward reaches them (:mod:`profiles.regions`). :class:`RegionBackend`
is its backend: it takes the ``c``-th graph it is given as the plan's regions
with ``graph == c`` and compiles one split per region, each by the decisions on
the region's nodes (``Plan.regions[k].prefix``), checked against the region's
fingerprint. A graph that runs several times in a step (a module that breaks the
graph, called in turn for each layer) runs the split of its ``t``-th region on
its ``t``-th call of the step (:meth:`RegionBackend.start_step` starts the count).
Inputs of other shapes recompile every region: they are split by the plan made
for those shapes, which :meth:`RegionBackend.start_step` names.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from planner.plan_type import Plan
from profiles._torch_private import aot_autograd, copy_graph_module, make_boxed
from profiles.capture import prepare_joint
from profiles.causal_sdpa import with_causal_sdpa
from profiles.regions import where_traced
from profiles.signature import graph_fingerprint

from .partition import split_joint

__all__ = ["RegionBackend", "RegionMismatch"]


class RegionMismatch(ValueError):
    """The model compiles other regions than the plan's (another model, or other input shapes)."""


def _unlisted(where: str) -> str:
    return (
        f"the model runs a graph region at {where} that the plan does not list: the step took another path "
        "through the model's graph breaks than when it was planned (a branch on data, such as "
        "`if x.sum().item() > 0:`, went the other way), or the model changed since it was planned. The planner "
        "plans one path: make the branch traceable (torch.where, torch.cond), or plan again with "
        "planner.plan(model, budget_gb, inputs) for inputs that take this path"
    )


def _boxed_compiler(gm, example_inputs):
    return make_boxed(gm)


class RegionBackend:
    """A ``torch.compile`` backend that runs ``plan``'s regions as planned;
    ``graphs`` collects each region's ``(forward, backward)``."""

    def __init__(self, plan: Plan, graphs: list):
        self.plan = plan
        self.graphs = graphs
        self.compiled: dict[int, int] = {}
        self.calls: dict[tuple[int, int], int] = {}
        self.backend = with_causal_sdpa(self._compile)

    def start_step(self, plan: Plan) -> None:
        """A training step under ``plan`` starts (the module's plan, or the one made for
        these inputs' shapes): graphs compiled now are its regions, and each graph's
        next call is its first of the step."""
        self.plan = plan
        self.calls.clear()

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Callable:
        return self.backend(gm, example_inputs)

    def _compile(self, gm: fx.GraphModule, example_inputs) -> Callable:
        plan = self.plan
        c = self.compiled.get(id(plan), 0)  # dynamo compiles each plan's graphs in the order the capture did
        self.compiled[id(plan)] = c + 1
        mine = [k for k, r in enumerate(plan.regions) if r.graph == c]
        if not mine:
            # a graph without backward (nothing in it requires grad): the capture left it out
            return aot_autograd(fw_compiler=_boxed_compiler, bw_compiler=_boxed_compiler,
                                partition_fn=self._unplanned(where_traced(gm)))(gm, example_inputs)
        runs = [aot_autograd(fw_compiler=_boxed_compiler, bw_compiler=_boxed_compiler,
                             partition_fn=self._partition(plan, k, where_traced(gm)))(copy_graph_module(gm), example_inputs)
                for k in mine]

        def run(*args):
            t = self.calls.get((id(plan), c), 0)
            self.calls[(id(plan), c)] = t + 1
            if t >= len(runs):
                raise RegionMismatch(
                    f"the graph region at {plan.regions[mine[0]].where} runs more than the {len(runs)} time(s) per "
                    "step it was planned for: plan again for these inputs with planner.plan(model, budget_gb, inputs)"
                )
            return runs[t](*args)

        if all(getattr(r, "_boxed_call", False) for r in runs):
            run._boxed_call = True
        return run

    def _partition(self, plan: Plan, k: int, where: str):
        region = plan.regions[k]
        recompute = frozenset(n[len(region.prefix):] for n in plan.recomputed if n.startswith(region.prefix))

        def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
            got = graph_fingerprint(joint, num_fwd_outputs)
            if got != region.fingerprint:
                raise RegionMismatch(_unlisted(f"{where} (fingerprint {got}; the plan's region "
                                               f"{region.prefix} at {region.where} has {region.fingerprint})"))
            prepare_joint(joint, dropout=plan.dropout, num_fwd_outputs=num_fwd_outputs)
            fwd, bwd, _ = split_joint(joint, recompute, num_fwd_outputs=num_fwd_outputs)
            self.graphs.append((fwd, bwd))
            return fwd, bwd

        return partition

    def _unplanned(self, where: str):
        def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
            raise RegionMismatch(_unlisted(where))

        return partition
