"""The largest batch that fits a budget, and the batch with the best estimated throughput.

:func:`fit_batch` plans the model at growing batch sizes (doubling, then bisecting
between the last that fits and the first that does not) and returns a
:class:`BatchFit`: per batch size tried, the plan or why there is none, the
recompute overhead, and the estimated step time per sample (the step's time plus
recomputation, by the plan's time estimate, over the batch). The recommended batch
is the one with the most samples per estimated second: recomputation grows with
the batch near the budget, so it is not always the largest. matplotlib is needed
only by :meth:`BatchFit.plot`.
"""

from __future__ import annotations

import dataclasses
import html as _html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import api
from .plan_type import Plan
from .units import GiB, format_bytes, format_flops
from .view import pyplot

__all__ = ["fit_batch", "BatchFit", "BatchPoint", "scale_batch"]


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchPoint:
    """One batch size tried: its plan, or the lowest budget it would need."""

    #: Samples per step (per rank under a data-parallel engine).
    batch: int
    #: The plan at this batch size; ``None`` when none fits the budget.
    plan: Plan | None
    #: When no plan fits: the lowest budget that would (``BudgetTooSmall.min_budget_bytes``).
    min_budget_bytes: int | None = None

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def step_time_s(self) -> float | None:
        """Estimated seconds of the planned step: forward, backward and recomputation."""
        return None if self.plan is None else self.plan.step_time_s + self.plan.recompute_time_s

    @property
    def time_per_sample_s(self) -> float | None:
        t = self.step_time_s
        return None if t is None else t / self.batch

    @property
    def overhead(self) -> float | None:
        """Recompute time as a fraction of the step's time without recomputation."""
        p = self.plan
        return None if p is None else (p.recompute_time_s / p.step_time_s if p.step_time_s else 0.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchFit:
    """Batch sizes planned against one budget: which fit, and at what estimated cost."""

    #: The budget, in bytes (per rank for a per-rank plan).
    budget_bytes: int
    #: Every batch size tried, smallest first.
    points: tuple[BatchPoint, ...]
    #: Class name of the model.
    model_class: str = ""

    @property
    def feasible(self) -> list[BatchPoint]:
        return [p for p in self.points if p.fits]

    @property
    def largest(self) -> int | None:
        """The largest batch size that plans within the budget (None: not even the smallest tried)."""
        return max((p.batch for p in self.feasible), default=None)

    @property
    def recommended(self) -> int | None:
        """The feasible batch size with the most samples per estimated second (the larger on a tie)."""
        best = min(self.feasible, key=lambda p: (p.time_per_sample_s, -p.batch), default=None)
        return None if best is None else best.batch

    def plan_for(self, batch: int) -> Plan:
        """The plan made for ``batch`` (``KeyError`` when it was not tried or does not fit)."""
        for p in self.points:
            if p.batch == batch and p.plan is not None:
                return p.plan
        raise KeyError(f"no plan for batch size {batch}: tried {[p.batch for p in self.points]}, "
                       f"fitting {[p.batch for p in self.feasible]}")

    def table(self) -> str:
        """One line per batch size tried; the recommended one marked."""
        lines = [
            f"{self.model_class or 'model'}: budget {format_bytes(self.budget_bytes)}; largest batch that fits "
            f"{self.largest}, best estimated throughput at batch {self.recommended}",
            f"{'batch':>6} {'peak':>12} {'recompute':>12} {'overhead':>9} {'est. step':>10} {'per sample':>11}  note",
        ]
        for p in self.points:
            if p.plan is None:
                need = format_bytes(p.min_budget_bytes) if p.min_budget_bytes else "?"
                lines.append(f"{p.batch:>6} {'-':>12} {'-':>12} {'-':>9} {'-':>10} {'-':>11}  does not fit (needs {need})")
                continue
            mark = "  <- recommended" if p.batch == self.recommended else ""
            lines.append(
                f"{p.batch:>6} {format_bytes(p.plan.predicted_peak_bytes):>12} {format_flops(p.plan.recompute_flops):>12} "
                f"{100 * p.overhead:>8.1f}% {1e3 * p.step_time_s:>8.2f}ms {1e3 * p.time_per_sample_s:>9.3f}ms{mark}"
            )
        return "\n".join(lines)

    def plot(self, *, ax=None, title: str | None = None):
        """Estimated samples per second and recompute overhead against batch size. Returns the ``Axes``."""
        if ax is None:
            _, ax = pyplot().subplots(figsize=(6.5, 4), layout="constrained")
        pts = self.feasible
        xs = [p.batch for p in pts]
        ax.plot(xs, [1 / p.time_per_sample_s if p.time_per_sample_s else 0 for p in pts], "o-", color="tab:blue",
                label="samples / s (estimated)")
        if self.recommended is not None:
            ax.axvline(self.recommended, color="tab:blue", ls=":", lw=1, label=f"recommended: {self.recommended}")
        for p in self.points:
            if not p.fits:
                ax.axvline(p.batch, color="tab:red", ls="--", lw=1, label=f"does not fit: {p.batch}")
                break
        ax2 = ax.twinx()
        ax2.plot(xs, [100 * p.overhead for p in pts], "s--", color="tab:orange", ms=4, lw=1, label="recompute overhead")
        ax2.set_ylabel("recompute, % of step time", color="tab:orange")
        ax2.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("estimated samples per second")
        ax.set_ylim(bottom=0)
        ax.set_title(title or f"{self.model_class or 'model'}: batch size within {format_bytes(self.budget_bytes)}",
                     fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        more = ax2.get_legend_handles_labels()
        ax.legend(handles + more[0], labels + more[1], fontsize=8, loc="lower right")
        return ax

    def _repr_html_(self) -> str:
        return "<pre>" + _html.escape(self.table()) + "</pre>"


def _batch_of(inputs: Any) -> int:
    tensors = list(inputs.values()) if isinstance(inputs, dict) else list(inputs if isinstance(inputs, (tuple, list)) else [inputs])
    sizes = {t.shape[0] for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"cannot tell the batch size of the example inputs (leading sizes {sorted(sizes)}): give a function "
            "batch_size -> inputs instead"
        )
    return sizes.pop()


def scale_batch(inputs: Any, batch: int) -> Any:
    """``inputs`` with every tensor's leading (batch) dimension made ``batch``: the
    samples repeated in order, or the first ``batch`` of them."""
    b0 = _batch_of(inputs)

    def one(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = -(-batch // b0)
        return (t.repeat(reps, *([1] * (t.dim() - 1))) if reps > 1 else t)[:batch].clone()

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(one(v) for v in inputs)
    return one(inputs)


def _try(model, budget_gb: float, make: Callable[[int], Any], batch: int, kw: dict) -> BatchPoint:
    try:
        return BatchPoint(batch=batch, plan=api.plan(model, budget_gb, make(batch), **kw))
    except api.BudgetTooSmall as e:
        return BatchPoint(batch=batch, plan=None, min_budget_bytes=e.min_budget_bytes)


def fit_batch(
    model: torch.nn.Module,
    budget_gb: float,
    inputs: Any,
    *,
    start: int = 1,
    max_batch: int = 4096,
    log: Callable[[str], None] | None = None,
    **plan_kwargs,
) -> BatchFit:
    """The batch sizes that plan within ``budget_gb``: from ``start``, doubling until a
    batch does not fit (or ``max_batch``), then bisecting to the largest that fits.

    ``inputs``: a function ``batch_size -> example inputs``, or example inputs whose
    tensors share a leading batch dimension (scaled by :func:`scale_batch`).
    ``plan_kwargs`` go to :func:`planner.plan` (``target``, ``solver``, ``world_size``,
    ``sharding``, ``optimizer``...); with ``deepspeed=config`` each batch size is planned
    as the config's micro-batch. ``log`` receives a line per batch size."""
    api.check_budget(budget_gb)
    for name, v in (("start", start), ("max_batch", max_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a whole number >= 1, not {v!r}")
    if start > max_batch:
        raise ValueError(f"start={start} is above max_batch={max_batch}")
    make = inputs if callable(inputs) else (lambda b: scale_batch(inputs, b))
    say = log or (lambda msg: None)
    settings = None
    if plan_kwargs.get("deepspeed") is not None:
        from .deepspeed_config import read_config

        ws = plan_kwargs.get("world_size", 1)
        settings = read_config(plan_kwargs["deepspeed"], world_size=None if ws == 1 else ws)
    points: dict[int, BatchPoint] = {}

    def attempt(b: int) -> BatchPoint:
        kw = dict(plan_kwargs)
        if settings is not None:
            kw["deepspeed"] = dataclasses.replace(settings, micro_batch=b)
            kw.pop("world_size", None)
        say(f"batch {b}: planning")
        points[b] = _try(model, budget_gb, make, b, kw)
        say(f"batch {b}: {'fits' if points[b].fits else 'does not fit'}")
        return points[b]

    b = start
    while attempt(b).fits and b < max_batch:
        b = min(2 * b, max_batch)
    lo = max((p.batch for p in points.values() if p.fits), default=None)
    hi = min((p.batch for p in points.values() if not p.fits), default=None)
    while lo is not None and hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid).fits:
            lo = mid
        else:
            hi = mid
    return BatchFit(budget_bytes=api.check_budget(budget_gb), points=tuple(points[k] for k in sorted(points)),
                    model_class=type(model).__name__)
