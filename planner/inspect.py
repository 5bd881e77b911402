"""Look at a plan: tables, the predicted memory timeline and its plot, trade-off sweeps, and a check against a real step.

Everything here reads a :class:`~planner.Plan` (or makes plans with
:func:`planner.plan`); nothing changes how plans are made or run. matplotlib is
needed only by the plotting functions (``pip install 'checkpoint-planner[plot]'``).

- :func:`memory_timeline` / :func:`plot`: predicted live bytes through forward and
  backward, eager (no checkpointing) against the plan.
- :func:`table` / :func:`html`: per-module bytes saved and recomputed, the largest
  recomputed values, totals (``planner show`` and ``Plan._repr_html_``).
- :func:`sweep`: plans at several budgets, the memory/recompute trade-off.
- :func:`verify`: apply a plan, run one step, compare peak and gradients with eager.
"""

from __future__ import annotations

import copy
import difflib
import html as _html
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .plan_type import GiB, Plan

__all__ = [
    "memory_timeline",
    "plot",
    "table",
    "html",
    "sweep",
    "Sweep",
    "SweepPoint",
    "verify",
    "Verification",
    "format_bytes",
    "format_flops",
]

MiB = 2**20


# -- units ----------------------------------------------------------------
def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.50 KiB"``; ``None`` -> ``"-"``."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_flops(n: float | None) -> str:
    """``2.5e9`` -> ``"2.50 GFLOP"``."""
    if n is None:
        return "-"
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} FLOP"


def _byte_unit(largest: float) -> tuple[str, int]:
    return ("GiB", GiB) if largest >= 4 * GiB else ("MiB", MiB)


# -- the timeline -----------------------------------------------------------
def _classify(points: Sequence[tuple[str, str, int]], forward_names: set[str]) -> list[str]:
    """A kind for each point of one timeline (see :func:`memory_timeline`)."""
    kinds = []
    bwd = [i for i, p in enumerate(points) if p[0] == "backward"]
    last_placeholder = max((i for i in bwd if points[i][1].startswith("tangents")), default=-1)
    for i, (phase, node, _) in enumerate(points):
        if phase == "forward":
            kinds.append("input" if node.startswith("primals") else "forward")
        elif node.startswith("tangents"):
            kinds.append("tangent")
        elif i <= last_placeholder:
            kinds.append("saved")
        elif node in forward_names:
            kinds.append("recompute")
        else:
            kinds.append("gradient")
    return kinds


def memory_timeline(plan: Plan) -> list[dict]:
    """The predicted live bytes through one training step, eager beside the plan.

    One row per step of forward then backward, merging the planned schedule with
    eager's (no checkpointing) by node: a step that runs in only one of them has
    ``None`` for the other's bytes. Each row is a dict:

    - ``step``: position (0, 1, ...); ``phase``: ``"forward"`` or ``"backward"``;
      ``node``: fx node name in the joint graph.
    - ``kind``: ``"input"`` (a parameter, buffer or input enters forward),
      ``"forward"`` (a forward op), ``"saved"`` (a value kept from forward is handed
      to backward), ``"tangent"`` (the gradient of a model output enters backward),
      ``"recompute"`` (backward rebuilds a value the plan did not keep) or
      ``"gradient"`` (a backward op computing gradients).
    - ``decision``: the plan's ``"save"``/``"recompute"`` for the value this forward
      step makes, when backward needs it; ``""`` otherwise.
    - ``planned_bytes`` / ``eager_bytes``: live bytes just after the step (the exact
      simulation the plan's peaks come from: parameters, buffers, inputs,
      activations, temporaries and gradients).
    - ``static_bytes``: parameters, buffers and inputs (live throughout).
    - ``saved_bytes``: in forward, the bytes of values the plan keeps for backward
      made so far (their own storage; views count 0). ``None`` in backward: the
      plan does not record when backward frees each saved value.
    - ``recomputed_bytes``: for a ``"recompute"`` step, the bytes it rebuilds (0
      for a view); 0 otherwise.
    """
    decisions = {n.name: n for n in plan.nodes}
    forward_names = {p[1] for p in (*plan.timeline, *plan.baseline_timeline) if p[0] == "forward"}
    planned_kinds = _classify(plan.timeline, forward_names)
    eager_kinds = _classify(plan.baseline_timeline, forward_names)
    rows: list[dict] = []
    saved_so_far = 0
    for phase in ("forward", "backward"):
        planned = [(k, p) for k, p in zip(planned_kinds, plan.timeline) if p[0] == phase]
        eager = [(k, p) for k, p in zip(eager_kinds, plan.baseline_timeline) if p[0] == phase]
        # Align the two schedules by (kind, node): the plan's backward has extra
        # recompute steps, eager's forward keeps a few values the plan drops.
        pk = [f"{k}:{p[1]}" for k, p in planned]
        ek = [f"{k}:{p[1]}" for k, p in eager]
        merged: list[tuple[str, int | None, int | None]] = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ek, b=pk, autojunk=False).get_opcodes():
            if tag == "equal":
                merged += [(pk[j], j, i) for i, j in zip(range(i1, i2), range(j1, j2))]
            else:  # eager-only steps first, then plan-only ones
                merged += [(ek[i], None, i) for i in range(i1, i2)]
                merged += [(pk[j], j, None) for j in range(j1, j2)]
        for key, pi, ei in merged:
            kind, node = key.split(":", 1)
            d = decisions.get(node)
            decision = d.decision if (d is not None and kind == "forward") else ""
            if decision == "save" and pi is not None:
                saved_so_far += d.bytes
            rows.append(
                {
                    "step": len(rows),
                    "phase": phase,
                    "node": node,
                    "kind": kind,
                    "decision": decision,
                    "planned_bytes": planned[pi][1][2] if pi is not None else None,
                    "eager_bytes": eager[ei][1][2] if ei is not None else None,
                    "static_bytes": plan.static_bytes,
                    "saved_bytes": saved_so_far if phase == "forward" else None,
                    "recomputed_bytes": (d.bytes if d is not None else 0) if kind == "recompute" else 0,
                }
            )
    return rows


def _filled(values: list[int | None]) -> list[float]:
    """Carry the last known value over steps where a schedule does not run."""
    out, last = [], math.nan
    for v in values:
        last = v if v is not None else last
        out.append(last)
    return out


def plot(plan: Plan, *, ax=None, title: str | None = None):
    """Draw :func:`memory_timeline`: eager vs the plan, the budget, the forward/backward
    boundary, what forward keeps for backward, and where backward recomputes.
    Returns the matplotlib ``Axes``."""
    plt = _pyplot()
    # Placeholder steps (inputs, saved values, tangents) allocate nothing: leave them out.
    rows = [r for r in memory_timeline(plan) if r["kind"] in ("forward", "recompute", "gradient")]
    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    unit, size = _byte_unit(max(plan.baseline_peak_bytes, plan.budget_bytes))
    x = list(range(len(rows)))
    eager = [v / size for v in _filled([r["eager_bytes"] for r in rows])]
    planned = [v / size for v in _filled([r["planned_bytes"] for r in rows])]
    static = plan.static_bytes / size
    n_fwd = sum(r["phase"] == "forward" for r in rows)
    ax.axhspan(0, static, color="0.85", lw=0, label=f"parameters, buffers, inputs ({format_bytes(plan.static_bytes)})")
    if n_fwd:
        kept = [static + r["saved_bytes"] / size for r in rows[:n_fwd]]
        ax.fill_between(x[:n_fwd], static, kept, step="post", color="tab:blue", alpha=0.18, lw=0,
                        label="kept for backward by the plan (forward)")
    ax.step(x, eager, where="post", color="tab:red", lw=1.1, alpha=0.85,
            label=f"eager, no checkpointing (peak {format_bytes(plan.baseline_peak_bytes)})")
    ax.step(x, planned, where="post", color="tab:blue", lw=1.5,
            label=f"plan, {plan.solver.name} (peak {format_bytes(plan.predicted_peak_bytes)})")
    rec = [i for i, r in enumerate(rows) if r["kind"] == "recompute" and r["planned_bytes"] is not None]
    if rec:
        ax.plot(rec, [planned[i] for i in rec], "|", color="tab:orange", ms=9, mew=1.2,
                label=f"backward recomputes a value ({len(rec)} steps)")
    ax.axhline(plan.budget_bytes / size, color="black", ls="--", lw=1, label=f"budget {format_bytes(plan.budget_bytes)}")
    top = max(eager + planned + [plan.budget_bytes / size])
    ax.set_ylim(0, top * 1.1)
    if 0 < n_fwd < len(rows):
        ax.axvline(n_fwd - 0.5, color="0.4", ls=":", lw=1)
        ax.text(n_fwd - 0.5, top * 1.02, "← forward ", ha="right", va="bottom", fontsize=8, color="0.3")
        ax.text(n_fwd - 0.5, top * 1.02, " backward →", ha="left", va="bottom", fontsize=8, color="0.3")
    ax.set_xlim(0, max(len(rows) - 1, 1))
    ax.set_xlabel("op of the training step, in the order it runs (forward, then backward)")
    ax.set_ylabel(f"predicted live {unit}")
    ax.set_title(title or f"{plan.model.get('class', 'model')}: predicted memory of one training step "
                 f"(plan recomputes {100 * plan.overhead:.1f}% of the FLOPs)", fontsize=10)
    if own_figure:
        ax.figure.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    else:
        ax.legend(fontsize=7.5)
    return ax


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or 'checkpoint-planner[plot]')") from e
    return plt


# -- tables -------------------------------------------------------------------
def _module_rows(plan: Plan, depth: int | None) -> list[dict]:
    rows = plan.by_module(depth)
    counts: dict[str, list[int]] = {}
    for n in plan.nodes:
        mod = n.module or "(top)"
        if depth is not None:
            mod = ".".join(mod.split(".")[:depth])
        c = counts.setdefault(mod, [0, 0])
        c[0 if n.decision == "save" else 1] += 1
    for r in rows:
        r["saved_values"], r["recomputed_values"] = counts.get(r["module"], [0, 0])
    return rows


def _headline(plan: Plan) -> list[tuple[str, str]]:
    saved = sum(n.bytes for n in plan.nodes if n.decision == "save")
    recomputed = sum(n.bytes for n in plan.nodes if n.decision == "recompute")
    solver = f"{plan.solver.name}: {plan.solver.status} in {plan.solver.seconds:.2f} s"
    if plan.solver.calls > 1:
        solver += f" ({plan.solver.calls} calls)"
    budget = format_bytes(plan.budget_bytes)
    d = plan.distributed
    if d:
        budget += (f" per rank of {d['world_size']} ({d['sharding']}, optimizer {d['optimizer']}; the engine adds "
                   f"{format_bytes(d['forward_bytes'])} in forward, {format_bytes(d['backward_bytes'])} in backward, "
                   f"{format_bytes(d['end_bytes'])} while gradients are reduced)")
    return [
        ("model", f"{plan.model.get('class', '?')} (fingerprint {plan.fingerprint or '?'}), target {plan.target}"),
        ("budget", budget),
        ("predicted peak", f"{format_bytes(plan.predicted_peak_bytes)} ({_pct(plan.predicted_peak_bytes, plan.budget_bytes)} of the budget)"),
        ("no-checkpoint peak", f"{format_bytes(plan.baseline_peak_bytes)} (the plan's peak is {format_bytes(plan.baseline_peak_bytes - plan.predicted_peak_bytes)} lower)"),
        ("params+buffers+inputs", format_bytes(plan.static_bytes)),
        ("recompute", f"{format_flops(plan.recompute_flops)} = {100 * plan.overhead:.1f}% of the step's {format_flops(plan.total_flops)}, "
                      f"~{plan.recompute_time_s * 1e3:.2f} ms ({plan.time_source or 'estimate'})"),
        ("values for backward", f"{len(plan.saved)} saved ({format_bytes(saved)}), {len(plan.recomputed)} recomputed ({format_bytes(recomputed)})"),
        ("solver", solver),
    ]


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def table(plan: Plan, *, depth: int | None = 2, top: int = 10) -> str:
    """A text report: headline numbers; per module (path cut to ``depth`` parts) the
    bytes saved and recomputed and the FLOPs recomputed; totals; the ``top``
    largest recomputed values. This is what ``planner show`` prints."""
    lines = [f"{k + ':':<23}{v}" for k, v in _headline(plan)]
    rows = _module_rows(plan, depth)
    unit, size = _byte_unit(max([r["saved_bytes"] + r["recomputed_bytes"] for r in rows] + [1]))
    fl_unit, fl_size = ("GFLOP", 1e9) if plan.total_flops >= 1e10 else ("MFLOP", 1e6)
    width = max([len(r["module"]) for r in rows] + [12])
    width = min(width, 48)
    head = f"{'module':<{width}} {'saved ' + unit:>11} {'#':>4} {'recomp ' + unit:>12} {'#':>4} {'recomp ' + fl_unit:>13} {'share':>6}"
    lines += ["", f"per module (depth {depth if depth is not None else 'full'}):", head, "-" * len(head)]
    total = {"saved_bytes": 0, "recomputed_bytes": 0, "recompute_flops": 0, "saved_values": 0, "recomputed_values": 0}

    def line(name, r):
        share = _pct(r["recompute_flops"], plan.recompute_flops) if plan.recompute_flops else "-"
        return (f"{name[:width]:<{width}} {r['saved_bytes'] / size:>11.3f} {r['saved_values']:>4} {r['recomputed_bytes'] / size:>12.3f} "
                f"{r['recomputed_values']:>4} {r['recompute_flops'] / fl_size:>13.3f} {share:>6}")

    for r in rows:
        lines.append(line(r["module"], r))
        for k in total:
            total[k] += r[k]
    lines += ["-" * len(head), line("total", total)]
    rec = sorted((n for n in plan.nodes if n.decision == "recompute"), key=lambda n: (-n.bytes, -n.flops, n.name))[:top]
    if rec:
        lines += ["", f"largest recomputed values (top {len(rec)} of {len(plan.recomputed)}):"]
        for n in rec:
            lines.append(f"  {n.name:<24} {n.op:<34} {(n.module or '(top)')[:36]:<36} {format_bytes(n.bytes):>11} {format_flops(n.flops):>13}")
    else:
        lines += ["", "nothing is recomputed"]
    return "\n".join(lines)


def html(plan: Plan, *, depth: int | None = 3, top: int = 10) -> str:
    """The same report as :func:`table`, as an HTML fragment (``Plan._repr_html_``)."""
    e = _html.escape
    parts = ["<div class='checkpoint-plan'>", "<b>checkpoint plan</b>", "<table>"]
    parts += [f"<tr><th style='text-align:left'>{e(k)}</th><td style='text-align:left'>{e(v)}</td></tr>" for k, v in _headline(plan)]
    parts.append("</table>")
    rows = _module_rows(plan, depth)
    parts.append(f"<details open><summary>per module (depth {depth})</summary><table>")
    parts.append("<tr><th>module</th><th>saved</th><th>#</th><th>recomputed</th><th>#</th><th>recompute FLOPs</th></tr>")
    for r in rows:
        parts.append(
            f"<tr><td style='text-align:left'>{e(r['module'])}</td><td>{e(format_bytes(r['saved_bytes']))}</td><td>{r['saved_values']}</td>"
            f"<td>{e(format_bytes(r['recomputed_bytes']))}</td><td>{r['recomputed_values']}</td><td>{e(format_flops(r['recompute_flops']))}</td></tr>"
        )
    parts.append("</table></details>")
    rec = sorted((n for n in plan.nodes if n.decision == "recompute"), key=lambda n: (-n.bytes, -n.flops, n.name))[:top]
    if rec:
        parts.append(f"<details><summary>largest recomputed values (top {len(rec)} of {len(plan.recomputed)})</summary><table>")
        parts.append("<tr><th>node</th><th>op</th><th>module</th><th>bytes</th><th>FLOPs</th></tr>")
        for n in rec:
            parts.append(f"<tr><td>{e(n.name)}</td><td>{e(n.op)}</td><td>{e(n.module)}</td><td>{e(format_bytes(n.bytes))}</td><td>{e(format_flops(n.flops))}</td></tr>")
        parts.append("</table></details>")
    parts.append("</div>")
    return "\n".join(parts)


# -- sweep -----------------------------------------------------------------------
@dataclass(frozen=True)
class SweepPoint:
    """One budget of a sweep: the plan made for it, or why there is none."""

    budget_bytes: int
    plan: Plan | None
    #: Why there is no plan (e.g. the budget is below the minimum).
    error: str = ""

    def row(self) -> dict:
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


@dataclass(frozen=True)
class Sweep:
    """Plans for one model at several budgets: the memory/recompute trade-off."""

    points: tuple[SweepPoint, ...]
    #: The lowest budget the planner can plan for (``None`` if no budget was below it
    #: and it was not asked for).
    min_budget_bytes: int | None
    #: Peak of the step without checkpointing.
    baseline_peak_bytes: int | None
    model_class: str = ""
    solver: str = "auto"
    rows: list[dict] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "rows", [p.row() for p in self.points])

    def table(self) -> str:
        """The trade-off as text: one line per budget."""
        lines = [
            f"{self.model_class or 'model'}: no-checkpoint peak {format_bytes(self.baseline_peak_bytes)}, minimum budget "
            f"{format_bytes(self.min_budget_bytes) if self.min_budget_bytes else 'not computed (no budget was below it)'}, "
            f"solver {self.solver}",
            f"{'budget':>12} {'peak':>12} {'of eager':>8} {'recompute':>13} {'overhead':>8} {'est. time':>10} {'#recomp':>7}  solver",
        ]
        for r in self.rows:
            of = _pct(r["predicted_peak_bytes"], self.baseline_peak_bytes) if r["predicted_peak_bytes"] is not None else "-"
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
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
        pts = [p.plan for p in self.points if p.plan is not None]
        largest = max([p.baseline_peak_bytes for p in pts] + [self.baseline_peak_bytes or 0, 1])
        unit, size = _byte_unit(largest)
        xs = [p.predicted_peak_bytes / size for p in pts]
        ys = [100 * p.overhead for p in pts]
        order = sorted(range(len(pts)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="tab:blue", label="recomputed FLOPs")
        if pts:  # FLOP counts leave out elementwise ops; the time estimate includes them
            ax2 = ax.twinx()
            ax2.plot([xs[i] for i in order], [1e3 * pts[i].recompute_time_s for i in order], "s--", color="tab:green",
                     ms=4, lw=1, label=f"recompute time, est. ({pts[0].time_source or pts[0].target})")
            ax2.set_ylabel("estimated recompute ms per step", color="tab:green")
            ax2.set_ylim(bottom=0)
        for p in self.points:
            ax.axvline(p.budget_bytes / size, color="0.8", lw=0.6, zorder=0)
        if self.baseline_peak_bytes:
            ax.axvline(self.baseline_peak_bytes / size, color="tab:red", ls="--", lw=1, label=f"no checkpointing {format_bytes(self.baseline_peak_bytes)}")
        if self.min_budget_bytes:
            ax.axvline(self.min_budget_bytes / size, color="black", ls=":", lw=1, label=f"minimum budget {format_bytes(self.min_budget_bytes)}")
        ax.set_xlabel(f"predicted peak ({unit}); grey lines: budgets asked for")
        ax.set_ylabel("recomputed FLOPs, % of the step")
        ax.set_ylim(bottom=0)
        ax.set_title(title or f"{self.model_class or 'model'}: memory / recompute trade-off ({self.solver})", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        for other in ax.figure.axes:
            if other is not ax and other.get_shared_x_axes().joined(ax, other):
                more = other.get_legend_handles_labels()
                handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, fontsize=8, loc="upper right")
        return ax

    def _repr_html_(self) -> str:
        return "<pre>" + _html.escape(self.table()) + "</pre>"


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
) -> Sweep:
    """Plan ``model`` at each of ``budgets_gb`` (GiB), or at ``points`` budgets spread
    evenly from the planner's minimum to the no-checkpoint peak. A budget below the
    minimum gives a point with no plan. ``log`` receives a line per step."""
    import planner  # the package; imported here to keep this module import-light

    say = log or (lambda msg: None)
    kw = dict(solver=solver, target=target, time_limit_s=time_limit_s, measure_time=measure_time)
    min_budget = baseline = None
    if budgets_gb is None:
        if isinstance(points, bool) or not isinstance(points, int) or points < 2:
            raise ValueError(f"points must be a whole number of at least 2, not {points!r}")
        say("finding the minimum budget")
        try:
            planner.plan(model, 1 / GiB, example_inputs, **kw)  # 1 byte: below any minimum
        except planner.BudgetTooSmall as e:
            min_budget = e.min_budget_bytes
        else:  # pragma: no cover - a step that fits in one byte
            min_budget = 1
        first = planner.plan(model, min_budget / GiB, example_inputs, **kw)
        baseline = first.baseline_peak_bytes
        budgets = [round(min_budget + (baseline - min_budget) * i / (points - 1)) for i in range(points)]
        done = {budgets[0]: first}
    else:
        budgets = [planner.api.check_budget(b) for b in budgets_gb]
        if not budgets:
            raise ValueError("budgets_gb is empty: give at least one budget in GiB")
        done = {}
    out = []
    for i, b in enumerate(budgets):
        say(f"budget {i + 1}/{len(budgets)}: {format_bytes(b)}")
        if b in done:
            p = done[b]
        else:
            try:
                p = planner.plan(model, b / GiB, example_inputs, **kw)
            except planner.BudgetTooSmall as e:
                min_budget = e.min_budget_bytes
                out.append(SweepPoint(b, None, f"below the minimum budget {format_bytes(e.min_budget_bytes)}"))
                continue
        baseline = p.baseline_peak_bytes
        out.append(SweepPoint(b, p))
    return Sweep(tuple(out), min_budget, baseline, model_class=type(model).__name__, solver=solver)


# -- verify ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Verification:
    """One real training step under a plan, measured against the prediction and eager."""

    budget_bytes: int
    predicted_peak_bytes: int
    #: Peak of the planned step: parameters, buffers and inputs plus the peak
    #: allocated above them (``profiles.measure_peak``).
    measured_peak_bytes: int
    #: The same for eager PyTorch (no checkpointing).
    eager_peak_bytes: int
    baseline_peak_bytes: int
    #: FLOPs of an eager step by ``torch.utils.flop_counter``, and the plan's figure.
    measured_step_flops: int
    plan_total_flops: int
    #: FLOPs of the recomputations in the backward graph that ran, and the plan's figure.
    measured_recompute_flops: int | None
    plan_recompute_flops: int
    loss_planned: float
    loss_eager: float
    #: Parameters whose gradients differ from eager's (beyond rtol/atol).
    mismatched: tuple[str, ...] = ()
    max_grad_diff: float = 0.0
    #: For a per-rank plan (``plan.distributed``) the step runs here in one process,
    #: without the engine: this is the plan's prediction for that step alone (its
    #: timeline less the engine's bytes per phase), which the measurement is
    #: compared with. 0 for a one-process plan.
    predicted_step_bytes: int = 0

    @property
    def per_rank(self) -> bool:
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

    def summary(self) -> str:
        rec = format_flops(self.measured_recompute_flops) if self.measured_recompute_flops is not None else "not counted"
        verdict = "within" if self.within_budget else "OVER"
        if self.per_rank:
            err = _pct(self.measured_peak_bytes - self.predicted_step_bytes, self.measured_peak_bytes)
            peak = [
                f"peak:      measured {format_bytes(self.measured_peak_bytes)} in one process without the engine, predicted "
                f"{format_bytes(self.predicted_step_bytes)} for that (off by {err})",
                f"per rank:  predicted {format_bytes(self.predicted_peak_bytes)}, with the step's measured excess "
                f"{format_bytes(self.checked_peak_bytes)}, budget {format_bytes(self.budget_bytes)}: {verdict} budget",
            ]
        else:
            err = _pct(self.measured_peak_bytes - self.predicted_peak_bytes, self.measured_peak_bytes)
            peak = [
                f"peak:      measured {format_bytes(self.measured_peak_bytes)}, predicted {format_bytes(self.predicted_peak_bytes)} "
                f"(off by {err}), budget {format_bytes(self.budget_bytes)}: {verdict} budget",
            ]
        lines = [
            *peak,
            f"eager:     measured {format_bytes(self.eager_peak_bytes)} (the plan's no-checkpoint peak"
            f"{' per rank' if self.per_rank else ''}: {format_bytes(self.baseline_peak_bytes)})",
            f"FLOPs:     step {format_flops(self.measured_step_flops)} measured, {format_flops(self.plan_total_flops)} planned; "
            f"recomputed {rec} in the backward graph, {format_flops(self.plan_recompute_flops)} planned",
            f"loss:      planned {self.loss_planned:.6g}, eager {self.loss_eager:.6g}",
        ]
        if self.grads_equal:
            lines.append(f"gradients: equal to eager's (largest difference {self.max_grad_diff:.3g})")
        else:
            names = ", ".join(self.mismatched[:5]) + (" ..." if len(self.mismatched) > 5 else "")
            lines.append(f"gradients: DIFFER from eager's for {len(self.mismatched)} parameters ({names}); largest difference {self.max_grad_diff:.3g}")
        lines.append("verdict:   " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


def _loss(out):
    import torch

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


def _step(module, args, kwargs, seed: int):
    import torch

    torch.manual_seed(seed)
    loss = _loss(module(*args, **kwargs))
    loss.backward()
    return float(loss.detach())


def verify(model, example_inputs: Any, plan: Plan, *, seed: int = 0, rtol: float = 1e-5, atol: float = 1e-6) -> Verification:
    """Apply ``plan`` to a copy of ``model``, run one training step and compare it with
    eager PyTorch on another copy: measured peak against the prediction and the
    budget, FLOPs, loss and gradients. ``model`` itself is not changed.

    The loss is the output when it is a scalar, its ``loss`` entry when it has one,
    otherwise the mean square of the first output tensor. Each copy runs a warm-up
    step first (the planned one compiles there), then the measured step, both with
    ``torch.manual_seed(seed)``. Raises ``runtime.PlanMismatch`` if the plan was
    made for another model or input shapes.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import runtime
    from profiles import measure_peak, normalize_inputs, storage_bytes

    args, kwargs = normalize_inputs(model, example_inputs)
    eager = copy.deepcopy(model).train()
    planned_model = copy.deepcopy(model).train()
    wrapped = runtime.apply(planned_model, plan)
    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")

    def peak(module, owner) -> tuple[int, float]:
        for p in owner.parameters():
            p.grad = None
        delta, loss = measure_peak(lambda: _step(module, args, kwargs, seed), device=device)
        static = storage_bytes([*owner.parameters(), *owner.buffers(), *args, *kwargs.values()])
        return static + delta, loss

    _step(wrapped, args, kwargs, seed)  # compiles; raises PlanMismatch for another model
    with FlopCounterMode(display=False) as counter:
        _step(eager, args, kwargs, seed)
    measured_planned, loss_p = peak(wrapped, planned_model)
    measured_eager, loss_e = peak(eager, eager)
    mismatched, worst = [], 0.0
    eager_params = dict(eager.named_parameters())
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
        **_one_process_prediction(plan),
    )


def _one_process_prediction(plan: Plan) -> dict:
    """``predicted_step_bytes`` of a per-rank plan ({} otherwise)."""
    from .distributed import from_record

    engine = from_record(plan.distributed)
    if engine is None:
        return {}
    step = max((b - (engine.forward if phase == "forward" else engine.backward) for phase, _, b in plan.timeline), default=0)
    return {"predicted_step_bytes": step}


def _recompute_flops_run(wrapped, plan: Plan) -> int | None:
    """FLOPs of the plan's recomputed values in the backward graph the runtime compiled."""
    graphs = getattr(wrapped, "compiled_graphs", None)
    try:
        from profiles.nodes import node_flops as _flops
    except ImportError:  # pragma: no cover - the profiler's internals moved
        return None
    if not graphs:
        return None
    names = set(plan.recomputed)
    _, bwd = graphs[-1]
    return sum(_flops(n) for n in bwd.graph.nodes if n.op == "call_function" and n.name in names)
