"""Run the split graphs in the order and with the buffer reuse the planner simulated.

:func:`planner.order.arrange` chooses, from the graphs alone (op temporaries play
no part in the choice), the node orders of the forward and backward graphs and
which ops write into an input that dies at them. The runtime makes the same
choice on the graphs ``split_joint`` built and applies it.
"""

from __future__ import annotations

import torch.fx as fx

from planner.order import arrange, reorder_graph
from planner.reuse import apply_reuse
from planner.schedule import schedule_of
from planner.zero_tangents import without_zero_tangents
from profiles.joint import JointGraph
from profiles.graph_profile import profile_graph

__all__ = ["arrange_graphs"]


def arrange_graphs(joint: fx.GraphModule, num_fwd_outputs: int, fwd: fx.GraphModule, bwd: fx.GraphModule, *,
                   dropout: str, granularity: int = 1, engine=None,
                   skipped_tangents: dict | None = None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """``(forward, backward)`` reordered and rewritten as :func:`planner.order.arrange` chooses;
    ``skipped_tangents``: the tangents that arrive as ``None``
    (:func:`planner.zero_tangents.skippable_tangents`), as the planner simulated them."""
    jg = JointGraph(gm=joint, num_fwd_outputs=num_fwd_outputs, primal_roles=[], primal_names=[], dropout=dropout)
    gp = profile_graph(jg, measure_temps=False)
    if skipped_tangents:
        gp = without_zero_tangents(gp, skipped_tangents)
    arr = arrange(gp, schedule_of(fwd, bwd), granularity=granularity, engine=engine)
    if arr.reordered[0]:
        fwd = reorder_graph(fwd, arr.schedule.forward)
    if arr.reordered[1]:
        bwd = reorder_graph(bwd, arr.schedule.backward)
    return apply_reuse(fwd, arr.reuse.forward), apply_reuse(bwd, arr.reuse.backward)
