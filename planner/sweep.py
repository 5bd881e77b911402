"""Plans for one model at several budgets: the memory/recompute trade-off, as rows, a table and a plot.

:func:`sweep` makes the plans (with :func:`planner.plan`); :class:`Sweep` holds them
and renders the trade-off. matplotlib is needed only by :meth:`Sweep.plot`.
"""

from __future__ import annotations

import html as _html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import api
from .plan_type import Plan
from .units import byte_unit, format_bytes, format_flops, percent
from .view import pyplot

__all__ = ["sweep", "Sweep", "SweepPoint"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SweepPoint:
    """One budget of a sweep: the plan made for it, or why there is none."""

    #: The budget asked for, in bytes.
    budget_bytes: int
    #: The plan for that budget; ``None`` when there is none (see ``error``).
    plan: Plan | None
    #: Why there is no plan (e.g. the budget is below the minimum).
    error: str = ""

    def row(self) -> dict:
        """The point's numbers (``None`` for a point without a plan) and the solver's words."""
        p = self.plan
        return {
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": p.predicted_peak_bytes if p else None,
            "recompute_flops": p.recompute_flops if p else None,
            "overhead": p.overhead if p else None,
            "recompute_time_s": p.recompute_time_s if p else None,
            "recomputed_values": len(p.recomputed) if p else None,
            "solver": f"{p.solver.name}: {p.solver.status}" if p else self.error,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Sweep:
    """Plans for one model at several budgets: the memory/recompute trade-off."""

    #: One point per budget, in the order asked.
    points: tuple[SweepPoint, ...]
    #: The lowest budget the planner can plan for (``None`` if no budget was below it
    #: and it was not asked for).
    min_budget_bytes: int | None
    #: Peak of the step without checkpointing.
    baseline_peak_bytes: int | None
    #: Class name of the model swept.
    model_class: str = ""
    #: The ``solver`` option the plans were made with.
    solver: str = "auto"

    @property
    def rows(self) -> list[dict]:
        """:meth:`SweepPoint.row` of each point."""
        return [p.row() for p in self.points]

    def table(self) -> str:
        """The trade-off as text: one line per budget."""
        minimum = format_bytes(self.min_budget_bytes) if self.min_budget_bytes else "not computed (no budget was below it)"
        lines = [
            f"{self.model_class or 'model'}: no-checkpoint peak {format_bytes(self.baseline_peak_bytes)}, minimum budget "
            f"{minimum}, solver {self.solver}",
            f"{'budget':>12} {'peak':>12} {'of eager':>8} {'recompute':>13} {'overhead':>8} {'est. time':>10} {'#recomp':>7}  solver",
        ]
        for r in self.rows:
            of = percent(r["predicted_peak_bytes"], self.baseline_peak_bytes) if r["predicted_peak_bytes"] is not None else "-"
            ovh = f"{100 * r['overhead']:.1f}%" if r["overhead"] is not None else "-"
            secs = f"{1e3 * r['recompute_time_s']:.2f} ms" if r["recompute_time_s"] is not None else "-"
            n = r["recomputed_values"] if r["recomputed_values"] is not None else "-"
            lines.append(
                f"{format_bytes(r['budget_bytes']):>12} {format_bytes(r['predicted_peak_bytes']):>12} {of:>8} "
                f"{format_flops(r['recompute_flops']):>13} {ovh:>8} {secs:>10} {n:>7}  {r['solver']}"
            )
        return "\n".join(lines)

    def plot(self, *, ax=None, title: str | None = None):
        """Recompute overhead (% of the step's FLOPs) against predicted peak. Returns the ``Axes``."""
        if ax is None:
            _, ax = pyplot().subplots(figsize=(6.5, 4), layout="constrained")
        pts = [p.plan for p in self.points if p.plan is not None]
        largest = max([p.baseline_peak_bytes for p in pts] + [self.baseline_peak_bytes or 0, 1])
        unit, size = byte_unit(largest)
        xs = [p.predicted_peak_bytes / size for p in pts]
        order = sorted(range(len(pts)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [100 * pts[i].overhead for i in order], "o-", color="tab:blue",
                label="recomputed FLOPs")
        if pts:  # FLOP counts leave out elementwise ops; the time estimate includes them
            ax2 = ax.twinx()
            ax2.plot([xs[i] for i in order], [1e3 * pts[i].recompute_time_s for i in order], "s--", color="tab:green",
                     ms=4, lw=1, label=f"recompute time, est. ({pts[0].time_source or pts[0].target})")
            ax2.set_ylabel("estimated recompute ms per step", color="tab:green")
            ax2.set_ylim(bottom=0)
        self._mark_budgets(ax, size)
        ax.set_xlabel(f"predicted peak ({unit}); grey lines: budgets asked for")
        ax.set_ylabel("recomputed FLOPs, % of the step")
        ax.set_ylim(bottom=0)
        ax.set_title(title or f"{self.model_class or 'model'}: memory / recompute trade-off ({self.solver})", fontsize=10)
        _legend_of_twins(ax)
        return ax

    def _mark_budgets(self, ax, size: int) -> None:
        """Vertical lines: each budget asked for, the no-checkpoint peak, the minimum budget."""
        for p in self.points:
            ax.axvline(p.budget_bytes / size, color="0.8", lw=0.6, zorder=0)
        if self.baseline_peak_bytes:
            ax.axvline(self.baseline_peak_bytes / size, color="tab:red", ls="--", lw=1,
                       label=f"no checkpointing {format_bytes(self.baseline_peak_bytes)}")
        if self.min_budget_bytes:
            ax.axvline(self.min_budget_bytes / size, color="black", ls=":", lw=1,
                       label=f"minimum budget {format_bytes(self.min_budget_bytes)}")

    def _repr_html_(self) -> str:
        return "<pre>" + _html.escape(self.table()) + "</pre>"


def _legend_of_twins(ax) -> None:
    """One legend on ``ax`` holding the entries of every axes sharing its x axis."""
    handles, labels = ax.get_legend_handles_labels()
    for other in ax.figure.axes:
        if other is not ax and other.get_shared_x_axes().joined(ax, other):
            more = other.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8, loc="upper right")


def _spread(step: api.PreparedStep, points: int, solver: str, say: Callable[[str], None]) -> tuple[list[int], dict, int]:
    """``points`` budgets from the planner's minimum to the no-checkpoint peak; the plan
    already made at the minimum, by budget; the minimum."""
    say("finding the minimum budget")
    try:
        step.plan(1, solver=solver)  # 1 byte: below any minimum
    except api.BudgetTooSmall as e:
        min_budget = e.min_budget_bytes
    else:  # pragma: no cover - a step that fits in one byte
        min_budget = 1
    first = step.plan(min_budget, solver=solver)
    baseline = first.baseline_peak_bytes
    budgets = [round(min_budget + (baseline - min_budget) * i / (points - 1)) for i in range(points)]
    return budgets, {budgets[0]: first}, min_budget


#: ``sweep``'s options that :func:`planner.prepare` fixes when it captures the step, with their defaults.
_CAPTURE_OPTIONS = {"example_inputs": None, "target": None, "time_limit_s": 60.0, "measure_time": False, "loss_fn": None}


def sweep(
    model,
    example_inputs: Any = None,
    *,
    budgets_gb: Sequence[float] | None = None,
    points: int = 6,
    solver: str = "auto",
    target: str | None = None,
    time_limit_s: float = 60.0,
    measure_time: bool = False,
    log: Callable[[str], None] | None = None,
    loss_fn: Callable[[Any], Any] | None = None,
) -> Sweep:
    """Plan ``model`` at each of ``budgets_gb`` (GiB), or at ``points`` budgets spread
    evenly from the planner's minimum to the no-checkpoint peak. A budget below the
    minimum gives a point with no plan. ``log`` receives a line per step. The step is
    captured once (:func:`planner.api.prepare`) and planned at each budget. ``loss_fn``:
    the loss outside the model, as :func:`planner.plan` takes it (counted at every budget).

    ``model`` may instead be a step :func:`planner.prepare` already captured (still open):
    it is planned at each budget without capturing again; its inputs, ``loss_fn``,
    ``target``, ``time_limit_s`` and ``measure_time`` are the ones given to ``prepare``
    (giving them here too is a ``ValueError``), and ``solver`` is this sweep's."""
    say = log or (lambda msg: None)
    budgets = None
    if budgets_gb is not None:
        budgets = [api.check_budget(b) for b in budgets_gb]
        if not budgets:
            raise ValueError("budgets_gb is empty: give at least one budget in GiB")
    elif isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be a whole number of at least 2, not {points!r}")
    if isinstance(model, api.PreparedStep):
        given = dict(example_inputs=example_inputs, target=target, time_limit_s=time_limit_s, measure_time=measure_time,
                     loss_fn=loss_fn)
        fixed = [k for k, v in given.items()
                 if (v is not None if _CAPTURE_OPTIONS[k] is None else v != _CAPTURE_OPTIONS[k])]
        if fixed:
            raise ValueError(f"sweep of a prepared step: {', '.join(fixed)} were fixed when the step was captured; "
                             "give them to planner.prepare(...), or sweep the model instead of the step")
        return _sweep(model, budgets, points, say, model_class=None, solver=solver)
    kw = dict(solver=solver, target=target, time_limit_s=time_limit_s, measure_time=measure_time, loss_fn=loss_fn)
    with api.prepare(model, example_inputs, **kw) as step:
        return _sweep(step, budgets, points, say, model_class=type(model).__name__, solver=solver)


def _sweep(step: api.PreparedStep, budgets: list[int] | None, points: int, say: Callable[[str], None], *,
           model_class: str | None, solver: str) -> Sweep:
    """:func:`sweep` on a captured step, with ``solver``: at ``budgets`` (bytes), or at
    ``points`` spread ones. ``model_class`` None: the class the plans record."""
    min_budget = baseline = None
    if budgets is None:
        budgets, done, min_budget = _spread(step, points, solver, say)
    else:
        done = {}
    out = []
    for i, b in enumerate(budgets):
        say(f"budget {i + 1}/{len(budgets)}: {format_bytes(b)}")
        if b in done:
            p = done[b]
        else:
            try:
                p = step.plan(b, solver=solver)
            except api.BudgetTooSmall as e:
                min_budget = e.min_budget_bytes
                out.append(SweepPoint(budget_bytes=b, plan=None,
                                      error=f"below the minimum budget {format_bytes(e.min_budget_bytes)}"))
                continue
        baseline = p.baseline_peak_bytes
        model_class = model_class or p.model.class_name
        out.append(SweepPoint(budget_bytes=b, plan=p))
    return Sweep(points=tuple(out), min_budget_bytes=min_budget, baseline_peak_bytes=baseline,
                 model_class=model_class or "", solver=solver)
