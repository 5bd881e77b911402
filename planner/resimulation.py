"""Re-simulate a plan's decisions on the graphs the runtime compiled for other input sizes.

``runtime.apply`` reuses a plan's decisions when new input shapes leave the graph's
structure unchanged; :func:`resimulate` predicts the peak of that step from the
graphs it actually split, so the runtime can warn when it is over the budget.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from profiles._torch_private import profiler_active, real_tensors
from profiles.allocator import granularity, graph_device_type
from profiles.joint import JointGraph
from profiles.graph_profile import profile_graph
from profiles.timing import synthetic_cpu_temps

from .distributed import from_record
from .plan_type import Plan
from .order import arrange
from .schedule import schedule_of
from .simulate import simulate

__all__ = ["resimulate"]


def resimulate(plan: Plan, joint: fx.GraphModule, forward: fx.GraphModule, backward: fx.GraphModule, *,
               num_fwd_outputs: int) -> int:
    """Peak bytes of the step that runs ``forward`` then ``backward``, split from
    ``joint`` (prepared like the plan's graph, at other sizes) by ``plan``'s decisions.

    Op temporaries are measured on CPU (on synthetic inputs) unless a profiler is
    running (a nested session would end the caller's); on a GPU the margin of
    recomputing plans stands in for them. A per-rank plan's engine bytes are the
    same at any shape.
    """
    jg = JointGraph(gm=joint, num_fwd_outputs=num_fwd_outputs, primal_roles=[], primal_names=[], dropout=plan.dropout)
    gp = profile_graph(jg, measure_temps=False)  # times do not matter for the peak
    device = graph_device_type(joint)
    if device == "cpu" and not profiler_active():
        with real_tensors():
            temps = synthetic_cpu_temps(jg)
        nodes = {name: dataclasses.replace(ni, temp_bytes=temps[name]) if name in temps else ni for name, ni in gp.nodes.items()}
        gp = dataclasses.replace(gp, nodes=nodes)
    engine = from_record(plan.distributed)
    sched = schedule_of(forward, backward)
    if plan.executor != "eager":  # Inductor orders the graphs itself
        return simulate(gp, sched, granularity=granularity(device), engine=engine).peak_bytes
    # the step as the runtime runs it op by op: arranged for memory (planner.order.arrange)
    return arrange(gp, sched, granularity=granularity(device), engine=engine).after_bytes
