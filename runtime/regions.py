"""Run a plan whose step breaks the graph: each region split by its own decisions.

``torch.compile`` (without ``fullgraph``) compiles such a model as regions, in the
order the forward reaches them (:mod:`profiles.regions`). :class:`RegionBackend`
is its backend: it finds the plan's regions a graph it is given is a call of, by
the fingerprint of its joint graph, and compiles one split per region, each by
the decisions on the region's nodes (``Plan.regions[k].prefix``). Dynamo compiles
a region again when a guard fails (after ``if x.item() > 0:`` it guards on the
value); the same graph gets the same split. A graph that runs several times in a step (a module that breaks the
graph, called in turn for each layer) runs the split of its ``t``-th region on
its ``t``-th call of the step (:meth:`RegionBackend.start_step` starts the count).
Inputs of other shapes recompile every region: they are split by the plan made
for those shapes, which :meth:`RegionBackend.start_step` names.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from planner.plan_type import Plan
from profiles._torch_private import aot_autograd, copy_graph_module
from profiles.capture import prepare_joint
from profiles.causal_sdpa import with_causal_sdpa
from profiles.regions import where_traced
from profiles.signature import graph_fingerprint

from .mismatch import PlanMismatch
from .partition import op_by_op, split_joint

__all__ = ["RegionBackend", "RegionMismatch"]


class RegionMismatch(PlanMismatch):
    """The model compiles other regions than the plan's (another model, or other input shapes)."""


def _unlisted(where: str) -> str:
    return (
        f"the model runs a graph region at {where} that the plan does not list: the step took another path "
        "through the model's graph breaks than when it was planned (a branch on data, such as "
        "`if x.sum().item() > 0:`, went the other way), or the model changed since it was planned. The planner "
        "plans one path: make the branch traceable (torch.where, torch.cond), or plan again with "
        "planner.plan(model, budget_gb, inputs) for inputs that take this path"
    )


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
        plan, where = self.plan, where_traced(gm)
        c = self.compiled.get(id(plan), 0)  # dynamo compiles a plan's graphs in the order the capture did
        self.compiled[id(plan)] = c + 1
        found: dict[str, list[int]] = {}
        first = aot_autograd(fw_compiler=op_by_op, bw_compiler=op_by_op,
                             partition_fn=self._first(plan, c, where, found))(copy_graph_module(gm), example_inputs)
        if "regions" not in found:
            return first  # a graph without backward (nothing in it requires grad): the capture left it out
        mine = found["regions"]
        runs = [first] + [aot_autograd(fw_compiler=op_by_op, bw_compiler=op_by_op,
                                       partition_fn=self._partition(plan, k))(copy_graph_module(gm), example_inputs)
                          for k in mine[1:]]
        key = (id(plan), id(runs[0]))

        def run(*args):
            t = self.calls.get(key, 0)
            self.calls[key] = t + 1
            if t >= len(runs):
                raise RegionMismatch(
                    f"the graph region at {where} runs more than the {len(runs)} time(s) per step it was planned "
                    "for: plan again for these inputs with planner.plan(model, budget_gb, inputs)"
                )
            return runs[t](*args)

        if all(getattr(r, "_boxed_call", False) for r in runs):
            run._boxed_call = True
        return run

    def _first(self, plan: Plan, c: int, where: str, found: dict):
        """The partition of a newly compiled graph: finds the plan's regions it is a
        call of by fingerprint (preferring those of the ``c``-th compiled graph: two
        places in the forward can trace the same graph), then splits it as the first."""

        def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
            got = graph_fingerprint(joint, num_fwd_outputs)
            same = [k for k, r in enumerate(plan.regions) if r.fingerprint == got]
            if not same:
                raise RegionMismatch(_unlisted(f"{where} (fingerprint {got})"))
            graphs = {plan.regions[k].graph for k in same}
            graph = c if c in graphs else plan.regions[same[0]].graph  # dynamo compiled it again (a guard failed)
            found["regions"] = [k for k in same if plan.regions[k].graph == graph]
            return self._partition(plan, found["regions"][0])(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)

        return partition

    def _partition(self, plan: Plan, k: int):
        region = plan.regions[k]
        recompute = frozenset(n[len(region.prefix):] for n in plan.recomputed if n.startswith(region.prefix))

        def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
            prepare_joint(joint, dropout=plan.dropout, num_fwd_outputs=num_fwd_outputs)
            fwd, bwd, _ = split_joint(joint, recompute, num_fwd_outputs=num_fwd_outputs)
            self.graphs.append((fwd, bwd))
            return fwd, bwd

        return partition
