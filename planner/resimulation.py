"""Re-simulate a plan's decisions on the graphs the runtime compiled for other input sizes.

``runtime.apply`` reuses a plan's decisions when new input shapes leave the graph's
structure unchanged; :func:`resimulate` predicts the peak of that step from the
graphs it actually split, so the runtime can warn when it is over the budget.

The training loop the plan was made for (``Plan.training_loop``) is honoured where
it does not depend on the shapes: gradients held from earlier micro-steps
(``grad_accumulation``) are the parameters' own. The loss computed outside the model
(``loss_fn``) was captured at the planned shapes, and the optimizer step's
temporaries come from the full optimizer configuration, which the plan does not
record: for those :func:`resimulate` raises :class:`LoopNotResimulated` rather than
predict a peak without them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

from profiles._torch_private import profiler_active, real_tensors
from profiles.allocator import granularity, graph_device_type, round_bytes
from profiles.joint import JointGraph
from profiles.graph_profile import profile_graph, with_temps
from profiles.timing import synthetic_cpu_temps

from .distributed import from_record
from .inductor_layout import with_layout_copies
from .order import arrange
from .plan_type import Plan
from .schedule import schedule_of
from .simulate import simulate
from .training_loop import TrainingLoop
from .zero_tangents import profile_as_run

__all__ = ["resimulate", "LoopNotResimulated"]


class LoopNotResimulated(ValueError):
    """The plan's training loop cannot be re-simulated at other input shapes (its loss
    outside the model, or its optimizer step): the step's peak there is not predicted."""


def _refuse_loop(plan: Plan) -> None:
    """:class:`LoopNotResimulated` when the plan's training loop depends on what it does not record."""
    info = plan.training_loop
    if info is None:
        return
    if info.loss == "model eager":
        raise LoopNotResimulated(
            "the plan counts the loss the model computes eagerly after its last graph region, measured at the "
            "planned shapes, so the step's peak at these shapes cannot be re-simulated; plan for these shapes with "
            "planner.plan(model, budget_gb, inputs) to know it"
        )
    if info.loss == "loss_fn":
        raise LoopNotResimulated(
            "the plan counts the loss computed outside the model (loss_fn), captured at the planned shapes, so the "
            "step's peak at these shapes cannot be re-simulated; plan for these shapes with "
            "planner.plan(model, budget_gb, inputs, loss_fn=...) to know it"
        )
    if info.optimizer != "none":
        raise LoopNotResimulated(
            f"the plan counts {info.optimizer}'s step, whose temporaries depend on its whole configuration, which the "
            "plan does not record, so the step's peak at these shapes cannot be re-simulated; plan for these shapes "
            "with planner.plan(model, budget_gb, inputs, optimizer=...) to know it"
        )


def _loop(plan: Plan, parameters: Iterable[torch.Tensor], gran: int) -> TrainingLoop | None:
    """What the plan's training loop adds at any input shapes (``parameters``: the model's)."""
    info = plan.training_loop
    if info is None:
        return None
    held = sum(round_bytes(p.numel() * p.element_size(), gran) for p in parameters if p.requires_grad)
    return TrainingLoop(held_grad_bytes=held if info.grad_accumulation else 0)


def resimulate(plan: Plan, joint: fx.GraphModule, forward: fx.GraphModule, backward: fx.GraphModule, *,
               num_fwd_outputs: int, parameters: Iterable[torch.Tensor] = ()) -> int:
    """Peak bytes of the step that runs ``forward`` then ``backward``, split from
    ``joint`` (prepared like the plan's graph, at other sizes) by ``plan``'s decisions.

    Op temporaries are measured on CPU (on synthetic inputs) unless a profiler is
    running (a nested session would end the caller's); on a GPU the margin of
    recomputing plans stands in for them. A per-rank plan's engine bytes are the
    same at any shape. ``parameters``: the model's (each once), for the gradients a
    ``grad_accumulation`` plan holds all step. Raises :class:`LoopNotResimulated` for a
    plan made with ``loss_fn`` or an optimizer.
    """
    _refuse_loop(plan)
    device = graph_device_type(joint)
    loop = _loop(plan, parameters, granularity(device))
    jg = JointGraph(gm=joint, num_fwd_outputs=num_fwd_outputs, primal_roles=[], primal_names=[], dropout=plan.dropout)
    gp = profile_graph(jg, measure_temps=False)  # times do not matter for the peak
    if device == "cpu" and not profiler_active():
        with real_tensors():
            temps = synthetic_cpu_temps(jg)
        gp = with_temps(gp, temps)
    engine, gp = with_layout_copies(from_record(plan.distributed), gp, plan.inductor_options)
    sched = schedule_of(forward, backward)
    if plan.executor == "eager":  # as the runtime runs it op by op: arranged for memory (Inductor orders its own)
        gp = profile_as_run(gp, loss=plan.training_loop.loss if plan.training_loop else None, blocks=False)
        arr = arrange(gp, sched, granularity=granularity(device), engine=engine)
        sched, gp = arr.schedule, arr.profile
    return simulate(gp, sched, granularity=granularity(device), engine=engine, loop=loop).peak_bytes
