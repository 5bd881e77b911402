"""Check a plan against a real step: apply it, run one training step, compare peak, FLOPs, loss and gradients with eager.

``verify(model, example_inputs, plan)`` returns a :class:`Verification`, whose
``summary()`` is what ``planner verify`` prints.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from planner import Plan
from planner.distributed import from_record
from planner.units import format_bytes, format_flops, percent
from profiles import measure_peak, normalize_inputs, storage_bytes
from profiles.graph_profile import count_flops
from runtime import apply

__all__ = ["verify", "Verification"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Verification:
    """One real training step under a plan, measured against the prediction and eager."""

    #: The plan's budget.
    budget_bytes: int
    #: The plan's predicted peak.
    predicted_peak_bytes: int
    #: Peak of the planned step: parameters, buffers and inputs plus the peak
    #: allocated above them (``profiles.measure_peak``).
    measured_peak_bytes: int
    #: The same for eager PyTorch (no checkpointing).
    eager_peak_bytes: int
    #: The plan's no-checkpoint peak.
    baseline_peak_bytes: int
    #: FLOPs of an eager step by ``torch.utils.flop_counter``.
    measured_step_flops: int
    #: The plan's FLOPs of the step.
    plan_total_flops: int
    #: FLOPs of the recomputations in the backward graph that ran (``None`` when the
    #: runtime compiled no graph).
    measured_recompute_flops: int | None
    #: The plan's recomputed FLOPs.
    plan_recompute_flops: int
    #: Loss of the planned step.
    loss_planned: float
    #: Loss of the eager step.
    loss_eager: float
    #: Parameters whose gradients differ from eager's (beyond rtol/atol).
    mismatched: tuple[str, ...] = ()
    #: Largest absolute difference between a planned and an eager gradient.
    max_grad_diff: float = 0.0
    #: For a per-rank plan (``plan.distributed``) the step runs here in one process,
    #: without the engine: this is the plan's prediction for that step alone (its
    #: timeline less the engine's bytes per phase), which the measurement is
    #: compared with. 0 for a one-process plan.
    predicted_step_bytes: int = 0

    @property
    def per_rank(self) -> bool:
        """Whether the plan is per rank (``predicted_step_bytes`` is then set)."""
        return self.predicted_step_bytes > 0

    @property
    def checked_peak_bytes(self) -> int:
        """The peak held against the budget: the measured one; for a per-rank plan, the
        per-rank prediction plus however much the measured step exceeded its own
        prediction (the engine's bytes are not measured here; tests/test_distributed.py
        and bench/bench_distributed.py measure them under DDP and FSDP2)."""
        if self.per_rank:
            return self.predicted_peak_bytes + max(0, self.measured_peak_bytes - self.predicted_step_bytes)
        return self.measured_peak_bytes

    @property
    def within_budget(self) -> bool:
        return self.checked_peak_bytes <= self.budget_bytes

    @property
    def grads_equal(self) -> bool:
        return not self.mismatched

    @property
    def ok(self) -> bool:
        return self.within_budget and self.grads_equal

    def _peak_lines(self) -> list[str]:
        verdict = "within" if self.within_budget else "OVER"
        if self.per_rank:
            err = percent(self.measured_peak_bytes - self.predicted_step_bytes, self.measured_peak_bytes)
            return [
                f"peak:      measured {format_bytes(self.measured_peak_bytes)} in one process without the engine, predicted "
                f"{format_bytes(self.predicted_step_bytes)} for that (off by {err})",
                f"per rank:  predicted {format_bytes(self.predicted_peak_bytes)}, with the step's measured excess "
                f"{format_bytes(self.checked_peak_bytes)}, budget {format_bytes(self.budget_bytes)}: {verdict} budget",
            ]
        err = percent(self.measured_peak_bytes - self.predicted_peak_bytes, self.measured_peak_bytes)
        return [
            f"peak:      measured {format_bytes(self.measured_peak_bytes)}, predicted {format_bytes(self.predicted_peak_bytes)} "
            f"(off by {err}), budget {format_bytes(self.budget_bytes)}: {verdict} budget",
        ]

    def _gradient_line(self) -> str:
        if self.grads_equal:
            return f"gradients: equal to eager's (largest difference {self.max_grad_diff:.3g})"
        names = ", ".join(self.mismatched[:5]) + (" ..." if len(self.mismatched) > 5 else "")
        return (f"gradients: DIFFER from eager's for {len(self.mismatched)} parameters ({names}); "
                f"largest difference {self.max_grad_diff:.3g}")

    def summary(self) -> str:
        """Peak, eager peak, FLOPs, loss, gradients and a verdict, one per line."""
        rec = format_flops(self.measured_recompute_flops) if self.measured_recompute_flops is not None else "not counted"
        lines = [
            *self._peak_lines(),
            f"eager:     measured {format_bytes(self.eager_peak_bytes)} (the plan's no-checkpoint peak"
            f"{' per rank' if self.per_rank else ''}: {format_bytes(self.baseline_peak_bytes)})",
            f"FLOPs:     step {format_flops(self.measured_step_flops)} measured, {format_flops(self.plan_total_flops)} planned; "
            f"recomputed {rec} in the backward graph, {format_flops(self.plan_recompute_flops)} planned",
            f"loss:      planned {self.loss_planned:.6g}, eager {self.loss_eager:.6g}",
            self._gradient_line(),
            "verdict:   " + ("OK" if self.ok else "FAILED"),
        ]
        return "\n".join(lines)


def _loss(out):
    """The output when it is a scalar, its ``loss`` entry when it has one, otherwise
    the mean square of the first output tensor."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.float().square().mean()
    if isinstance(out, dict) or hasattr(out, "keys"):
        if out.get("loss") is not None:
            return out["loss"]
        out = [v for v in out.values() if isinstance(v, torch.Tensor)]
    tensors = [t for t in out if isinstance(t, torch.Tensor)] if isinstance(out, (list, tuple)) else []
    if not tensors:
        raise TypeError(f"cannot make a loss from the model's output ({type(out).__name__}); return a tensor, a tuple or a dict")
    return _loss(tensors[0])


def _step(module, args, kwargs, seed: int, loss_fn=None) -> float:
    """One forward and backward under ``torch.manual_seed(seed)``, the loss computed
    by ``loss_fn`` (default :func:`_loss`) with the outputs held until backward ends; the loss."""
    torch.manual_seed(seed)
    out = module(*args, **kwargs)
    loss = (loss_fn or _loss)(out)
    loss.backward()
    return float(loss.detach())


def _compare_grads(planned_model, eager_model, rtol: float, atol: float) -> tuple[list[str], float]:
    """Parameters whose gradients differ (or exist in only one model); the largest difference."""
    mismatched, worst = [], 0.0
    eager_params = dict(eager_model.named_parameters())
    for name, p in planned_model.named_parameters():
        q = eager_params[name]
        if (p.grad is None) != (q.grad is None):
            mismatched.append(name)
            continue
        if p.grad is None:
            continue
        diff = float((p.grad.float() - q.grad.float()).abs().max()) if p.grad.numel() else 0.0
        worst = max(worst, diff)
        if not torch.allclose(p.grad, q.grad, rtol=rtol, atol=atol):
            mismatched.append(name)
    return mismatched, worst


def verify(model, example_inputs: Any, plan: Plan, *, seed: int = 0, rtol: float = 1e-5, atol: float = 1e-6,
           loss_fn=None) -> Verification:
    """Apply ``plan`` to a copy of ``model``, run one training step and compare it with
    eager PyTorch on another copy: measured peak against the prediction and the
    budget, FLOPs, loss and gradients. ``model`` itself is not changed.

    The loss is ``loss_fn(outputs)`` when given (as the plan was made with
    ``plan(..., loss_fn=)``), else the output when it is a scalar, its ``loss`` entry
    when it has one, otherwise the mean square of the first output tensor. Each copy runs a warm-up
    step first (the planned one compiles there), then the measured step, both with
    ``torch.manual_seed(seed)``. Raises ``runtime.PlanMismatch`` if the plan was
    made for another model or input shapes.
    """
    args, kwargs = normalize_inputs(model, example_inputs)
    eager = copy.deepcopy(model).train()
    planned_model = copy.deepcopy(model).train()
    wrapped = apply(planned_model, plan)
    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")

    def peak(module, owner) -> tuple[int, float]:
        for p in owner.parameters():
            p.grad = None
        delta, loss = measure_peak(lambda: _step(module, args, kwargs, seed, loss_fn), device=device)
        static = storage_bytes([*owner.parameters(), *owner.buffers(), *args, *kwargs.values()])
        return static + delta, loss

    _step(wrapped, args, kwargs, seed, loss_fn)  # compiles; raises PlanMismatch for another model
    with FlopCounterMode(display=False) as counter:
        _step(eager, args, kwargs, seed, loss_fn)
    measured_planned, loss_p = peak(wrapped, planned_model)
    measured_eager, loss_e = peak(eager, eager)
    mismatched, worst = _compare_grads(planned_model, eager, rtol, atol)
    return Verification(
        budget_bytes=plan.budget_bytes,
        predicted_peak_bytes=plan.predicted_peak_bytes,
        measured_peak_bytes=measured_planned,
        eager_peak_bytes=measured_eager,
        baseline_peak_bytes=plan.baseline_peak_bytes,
        measured_step_flops=int(counter.get_total_flops()),
        plan_total_flops=plan.total_flops,
        measured_recompute_flops=_recompute_flops_run(wrapped, plan),
        plan_recompute_flops=plan.recompute_flops,
        loss_planned=loss_p,
        loss_eager=loss_e,
        mismatched=tuple(mismatched),
        max_grad_diff=worst,
        predicted_step_bytes=_one_process_prediction(plan),
    )


def _one_process_prediction(plan: Plan) -> int:
    """For a per-rank plan, the predicted peak of its step without the engine's bytes; 0 otherwise."""
    engine = from_record(plan.distributed)
    if engine is None:
        return 0
    return max((b - (engine.forward if phase == "forward" else engine.backward) for phase, _, b in plan.timeline), default=0)


def _recompute_flops_run(wrapped, plan: Plan) -> int | None:
    """FLOPs of the plan's recomputed values in the backward graph the runtime compiled
    (``None`` when it compiled none)."""
    graphs = wrapped.compiled_graphs
    if not graphs:
        return None
    names = set(plan.recomputed)
    _, bwd = graphs[-1]
    flops, _ = count_flops(n for n in bwd.graph.nodes if n.op == "call_function" and n.name in names)
    return sum(flops.values())
