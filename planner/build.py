"""Package a solved problem as a :class:`~planner.plan_type.Plan`: the decision and
its reason for every forward value backward needs, with the step's numbers."""

from __future__ import annotations

from profiles.region_stitch import region_prefix

from .evaluation import Evaluation
from .plan_type import ModelInfo, NodeDecision, Plan, RegionInfo, SolverInfo
from .problem import Problem

__all__ = ["build_plan"]


def build_plan(
    prob: Problem,
    ev: Evaluation,
    *,
    baseline: Evaluation,
    budget_bytes: int,
    solver: SolverInfo,
    model_info: ModelInfo,
) -> Plan:
    """The plan of ``ev`` (``baseline``: the same step without recomputation)."""
    gp = prob.gp
    recomputed = set(ev.recomputed)
    saved = set(ev.saved)
    boundary = {n.name for n in gp.joint.gm.graph.nodes if n.meta.get("region_boundary")} if gp.joint.regions else set()
    decisions = tuple(_decision(prob, name, name in recomputed, name in boundary)
                      for name in prob.fwd if name in recomputed or name in saved)
    total_flops = sum(n.flops for n in gp.nodes.values() if n.phase in ("forward", "backward"))
    step_time = sum(n.time_s for n in gp.nodes.values() if n.phase in ("forward", "backward"))
    return Plan(
        model=model_info,
        target=gp.target,
        time_source=gp.time_source,
        dropout=gp.joint.dropout,
        executor=gp.joint.executor,
        budget_bytes=int(budget_bytes),
        predicted_peak_bytes=int(ev.sim.peak_bytes),
        baseline_peak_bytes=int(baseline.sim.peak_bytes),
        static_bytes=int(ev.sim.static_bytes),
        recompute_flops=int(ev.flops),
        total_flops=int(total_flops),
        recompute_time_s=float(ev.cost_s),
        step_time_s=float(step_time),
        solver=solver,
        nodes=decisions,
        timeline=tuple(prob.timeline(ev.recompute)),
        baseline_timeline=tuple(prob.timeline(baseline.recompute)),
        regions=tuple(
            RegionInfo(prefix=region_prefix(k), graph=r.graph, fingerprint=r.fingerprint, structure=r.structure, where=r.where)
            for k, r in enumerate(gp.joint.regions)
        ),
    )


def _decision(prob: Problem, name: str, recomputed: bool, boundary: bool) -> NodeDecision:
    """What the plan does with forward value ``name``, and why."""
    ni = prob.gp.nodes[name]
    if recomputed:
        reason = "view: free to rebuild" if prob.own_bytes.get(name, 0) == 0 else "recomputed from saved inputs"
    elif name in prob.free_save:
        reason = "model output: held anyway"
    elif boundary:
        reason = "region output: the next region's input, kept by it"
    elif not ni.recomputable:
        reason = "random or effectful op: never recomputed"
    else:
        reason = "saved for backward"
    return NodeDecision(
        name=name,
        op=ni.op,
        module=ni.module,
        bytes=prob.own_bytes.get(name, 0),
        flops=ni.flops,
        time_s=ni.time_s,
        decision="recompute" if recomputed else "save",
        reason=reason,
        inputs=tuple(prob.fwd_inputs[name]),
    )

