"""Rendering a plan for people: its headline and summary, tables (text and HTML), the memory timeline and its plot.

Every function takes a :class:`~planner.Plan` and reads it by attribute; this
module does not import ``plan_type`` (``plan_type`` imports it, for
``Plan.summary``, ``Plan.explain``, ``Plan.memory_timeline``, ``Plan.plot`` and
``Plan._repr_html_``). matplotlib is needed only by :func:`plot`
(``pip install 'checkpoint-planner[plot]'``).

- :func:`headline` / :func:`summary`: the plan's numbers as labelled lines: the one
  summary that ``Plan.summary()``, ``planner plan`` and the tables start with.
- :func:`table` / :func:`html`: per-module bytes saved and recomputed, the largest
  recomputed values, totals (``planner show`` and ``Plan._repr_html_``).
- :func:`explain`: the summary and a per-module table (``Plan.explain``).
- :func:`memory_timeline` / :func:`plot`: predicted live bytes through forward and
  backward, eager (no checkpointing) against the plan.
"""

from __future__ import annotations

import difflib
import html as _html
import math
from collections.abc import Sequence

from .units import MiB, byte_unit, format_bytes, format_flops, percent

__all__ = ["headline", "summary", "table", "html", "explain", "memory_timeline", "plot", "pyplot"]


# -- the summary ---------------------------------------------------------------
def _solver_text(plan) -> str:
    solver = f"{plan.solver.name}: {plan.solver.status} in {plan.solver.seconds:.2f} s"
    if plan.solver.calls > 1:
        solver += f" ({plan.solver.calls} calls)"
    return solver


def _budget_text(plan) -> str:
    budget = format_bytes(plan.budget_bytes)
    d = plan.distributed
    if d is not None:
        engine = d.sharding
        if d.deepspeed is not None:
            ds = d.deepspeed
            engine = (f"DeepSpeed ZeRO-{ds['stage']} {ds['precision']}, micro-batch {ds['micro_batch']} x "
                      f"{ds['accumulation']} accumulated")
        most, against = "", ""
        if d.fsdp_wrap == "blocks":
            b = d.fsdp_blocks
            engine = f"fsdp per block: fully_shard on {len(b)} blocks ({b[0]} .. {b[-1]}), then the model"
            most, against = "at most ", "; against the step with every parameter unsharded"
        budget += (f" per rank of {d.world_size} ({engine}, optimizer {d.optimizer}; the engine adds {most}"
                   f"{format_bytes(d.forward_bytes)} in forward, {most}{format_bytes(d.backward_bytes)} in backward, "
                   f"{format_bytes(d.end_bytes)} while gradients are reduced{against})")
    return budget


def headline(plan) -> list[tuple[str, str]]:
    """The plan's numbers as ``(label, text)`` pairs: model, budget (per rank, with the
    engine's bytes, for a distributed plan), predicted and no-checkpoint peaks, static
    bytes, recompute FLOPs and time, values saved and recomputed, solver."""
    saved = sum(n.bytes for n in plan.nodes if n.decision == "save")
    recomputed = sum(n.bytes for n in plan.nodes if n.decision == "recompute")
    peak, eager = plan.predicted_peak_bytes, plan.baseline_peak_bytes
    return [
        ("model", f"{plan.model.class_name or '?'} (fingerprint {plan.fingerprint or '?'}), target {plan.target}"),
        ("budget", _budget_text(plan)),
        ("predicted peak", f"{format_bytes(peak)} ({percent(peak, plan.budget_bytes)} of the budget)"),
        ("no-checkpoint peak", f"{format_bytes(eager)} (the plan's peak is {format_bytes(eager - peak)} lower)"),
        ("params+buffers+inputs", format_bytes(plan.static_bytes)),
        ("recompute", f"{format_flops(plan.recompute_flops)} = {100 * plan.overhead:.1f}% of the step's "
                      f"{format_flops(plan.total_flops)}, ~{plan.recompute_time_s * 1e3:.2f} ms "
                      f"({plan.time_source or 'estimate'})"),
        ("values for backward", f"{len(plan.saved)} saved ({format_bytes(saved)}), "
                                f"{len(plan.recomputed)} recomputed ({format_bytes(recomputed)})"),
        *_loop_lines(plan),
        *_region_headline(plan),
        *_repeated_headline(plan),
        *_inductor_headline(plan),
        ("solver", _solver_text(plan)),
    ]


def _inductor_headline(plan) -> list[tuple[str, str]]:
    """The Inductor options the predicted peak assumes (a graph that convolves on the CPU)."""
    options = dict(getattr(plan, "inductor_options", ()))
    if not options:
        return []
    layouts = ("channels-last layouts off (compile_options): no copies, a slower and less accurate step"
               if options.get("layout_optimization") is False
               else "channels-last layouts, their copies counted as they live, graphs simulated fused")
    return [("inductor", f"{layouts}; compiled with {', '.join(f'{k}={v!r}' for k, v in options.items())}")]


def _repeated_headline(plan) -> list[tuple[str, str]]:
    """How the step was traced, when a deep stack was traced with a few layers and repeated."""
    if not plan.model.repeated:
        return []
    stack, traced, layers = plan.model.repeated
    return [("traced", f"{traced} of the {layers} layers of {stack}, the joint graph repeated to all {layers}")]


def _region_headline(plan) -> list[tuple[str, str]]:
    """How many graph regions the step runs as, for a model that breaks the graph."""
    regions = getattr(plan, "regions", ())
    if not regions:
        return []
    return [("graph regions", f"{len(regions)}: the model breaks the graph; node names start with the region "
                              f"({regions[0].prefix}...{regions[-1].prefix}), see the regions table")]


def _region_table(plan) -> list[str]:
    """Per region, in the order the step runs them: where in the user's code, bytes saved and recomputed."""
    regions = getattr(plan, "regions", ())
    if not regions:
        return []
    lines = ["", "graph regions, in the order forward runs them (backward runs them in reverse):"]
    for r in regions:
        mine = [n for n in plan.nodes if n.name.startswith(r.prefix)]
        saved = sum(n.bytes for n in mine if n.decision == "save")
        recomputed = sum(n.bytes for n in mine if n.decision == "recompute")
        lines.append(f"  {r.prefix:<5} saved {format_bytes(saved):>11}, recomputed {format_bytes(recomputed):>11}  {r.where}")
    return lines


def _loop_lines(plan) -> list[tuple[str, str]]:
    """What the budget assumed of the training loop (``Plan.training_loop``), when it
    adds to the model's own step or leaves the loss out."""
    loop = getattr(plan, "training_loop", None)
    if loop is None or (loop.loss == "model" and not loop.grad_accumulation and loop.optimizer == "none"):
        return []  # nothing beyond the model's own step
    loss = {"loss_fn": f"loss_fn's forward and backward counted (peak {format_bytes(loop.loss_peak_bytes)})",
            "model": "the model returns its loss",
            "model eager": f"the model's eager loss measured and counted (peak {format_bytes(loop.loss_peak_bytes)})",
            "output gradients": "loss NOT counted, only the output gradients (pass loss_fn=)"}
    text = f"{loss[loop.loss]}; gradients {'accumulated (held all step)' if loop.grad_accumulation else 'None at the start'}"
    lines = [("training loop", text)]
    if loop.optimizer != "none":
        lines.append(("optimizer step", f"{loop.optimizer} ({loop.optimizer_implementation}), state "
                      f"{format_bytes(loop.optimizer_state_bytes)}: opt.step() peak {format_bytes(loop.optimizer_step_peak_bytes)}, "
                      f"backward peak {format_bytes(loop.backward_peak_bytes)}"))
    return lines


def summary(plan) -> str:
    """:func:`headline` as aligned ``label: text`` lines (``Plan.summary()``, the summary
    ``planner plan`` prints, and the first lines of ``planner show``)."""
    return "\n".join(f"{k + ':':<23}{v}" for k, v in headline(plan))


# -- tables ---------------------------------------------------------------------
def _module_rows(plan, depth: int | None) -> list[dict]:
    """``plan.by_module(depth)`` with the number of values saved and recomputed per module."""
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


def _largest_recomputed(plan, top: int) -> list:
    """The ``top`` largest recomputed values: by bytes, then FLOPs, then name."""
    rec = (n for n in plan.nodes if n.decision == "recompute")
    return sorted(rec, key=lambda n: (-n.bytes, -n.flops, n.name))[:top]


def _module_table(plan, depth: int | None) -> list[str]:
    """The per-module lines of :func:`table`, with their header and the totals."""
    rows = _module_rows(plan, depth)
    unit, size = byte_unit(max([r["saved_bytes"] + r["recomputed_bytes"] for r in rows] + [1]))
    fl_unit, fl_size = ("GFLOP", 1e9) if plan.total_flops >= 1e10 else ("MFLOP", 1e6)
    width = min(max([len(r["module"]) for r in rows] + [12]), 48)
    head = (f"{'module':<{width}} {'saved ' + unit:>11} {'#':>4} {'recomp ' + unit:>12} {'#':>4} "
            f"{'recomp ' + fl_unit:>13} {'share':>6}")
    lines = ["", f"per module (depth {depth if depth is not None else 'full'}):", head, "-" * len(head)]
    total = {"saved_bytes": 0, "recomputed_bytes": 0, "recompute_flops": 0, "saved_values": 0, "recomputed_values": 0}

    def line(name, r):
        share = percent(r["recompute_flops"], plan.recompute_flops) if plan.recompute_flops else "-"
        return (f"{name[:width]:<{width}} {r['saved_bytes'] / size:>11.3f} {r['saved_values']:>4} "
                f"{r['recomputed_bytes'] / size:>12.3f} {r['recomputed_values']:>4} "
                f"{r['recompute_flops'] / fl_size:>13.3f} {share:>6}")

    for r in rows:
        lines.append(line(r["module"], r))
        for k in total:
            total[k] += r[k]
    return lines + ["-" * len(head), line("total", total)]


def table(plan, *, depth: int | None = 2, top: int = 10) -> str:
    """A text report: :func:`summary`; per module (path cut to ``depth`` parts) the
    bytes saved and recomputed and the FLOPs recomputed; totals; the ``top``
    largest recomputed values. This is what ``planner show`` prints."""
    lines = [summary(plan), *_region_table(plan), *_module_table(plan, depth)]
    rec = _largest_recomputed(plan, top)
    if rec:
        lines += ["", f"largest recomputed values (top {len(rec)} of {len(plan.recomputed)}):"]
        for n in rec:
            lines.append(f"  {n.name:<24} {n.op:<34} {(n.module or '(top)')[:36]:<36} {format_bytes(n.bytes):>11} "
                         f"{format_flops(n.flops):>13}")
    else:
        lines += ["", "nothing is recomputed"]
    return "\n".join(lines)


def html(plan, *, depth: int | None = 3, top: int = 10) -> str:
    """The same report as :func:`table`, as an HTML fragment (``Plan._repr_html_``)."""
    e = _html.escape
    left = "style='text-align:left'"
    parts = ["<div class='checkpoint-plan'>", "<b>checkpoint plan</b>", "<table>"]
    parts += [f"<tr><th {left}>{e(k)}</th><td {left}>{e(v)}</td></tr>" for k, v in headline(plan)]
    parts.append("</table>")
    parts.append(f"<details open><summary>per module (depth {depth})</summary><table>")
    parts.append("<tr><th>module</th><th>saved</th><th>#</th><th>recomputed</th><th>#</th><th>recompute FLOPs</th></tr>")
    for r in _module_rows(plan, depth):
        parts.append(
            f"<tr><td {left}>{e(r['module'])}</td><td>{e(format_bytes(r['saved_bytes']))}</td><td>{r['saved_values']}</td>"
            f"<td>{e(format_bytes(r['recomputed_bytes']))}</td><td>{r['recomputed_values']}</td>"
            f"<td>{e(format_flops(r['recompute_flops']))}</td></tr>"
        )
    parts.append("</table></details>")
    rec = _largest_recomputed(plan, top)
    if rec:
        parts.append(f"<details><summary>largest recomputed values (top {len(rec)} of {len(plan.recomputed)})</summary><table>")
        parts.append("<tr><th>node</th><th>op</th><th>module</th><th>bytes</th><th>FLOPs</th></tr>")
        for n in rec:
            parts.append(f"<tr><td>{e(n.name)}</td><td>{e(n.op)}</td><td>{e(n.module)}</td><td>{e(format_bytes(n.bytes))}</td>"
                         f"<td>{e(format_flops(n.flops))}</td></tr>")
        parts.append("</table></details>")
    parts.append("</div>")
    return "\n".join(parts)


def explain(plan, *, depth: int | None = 3, top: int = 10) -> str:
    """:func:`summary`, then per module (path cut to ``depth`` parts) MiB saved and
    recomputed and GFLOP recomputed, then the ``top`` largest recomputed values by bytes."""
    lines = [summary(plan), *_region_table(plan), "", f"{'module':<40} {'saved MiB':>10} {'recomp MiB':>10} {'recomp GFLOP':>12}"]
    for r in plan.by_module(depth):
        lines.append(
            f"{r['module'][:40]:<40} {r['saved_bytes'] / MiB:>10.2f} {r['recomputed_bytes'] / MiB:>10.2f} "
            f"{r['recompute_flops'] / 1e9:>12.4f}"
        )
    rec = sorted((n for n in plan.nodes if n.decision == "recompute"), key=lambda n: -n.bytes)[:top]
    if rec:
        lines += ["", "largest recomputed values:"]
        for n in rec:
            lines.append(f"  {n.name:<28} {n.op:<36} {n.module:<32} {n.bytes / MiB:8.2f} MiB")
    return "\n".join(lines)


# -- the timeline -----------------------------------------------------------------
def _classify(points: Sequence[tuple[str, str, int]], forward_names: set[str]) -> list[str]:
    """A kind for each point of one timeline (see :func:`memory_timeline`)."""
    kinds = []
    bwd = [i for i, p in enumerate(points) if p[0] == "backward"]
    last_placeholder = max((i for i in bwd if points[i][1].startswith("tangents")), default=-1)
    for i, (phase, node, _) in enumerate(points):
        if phase in ("loss", "optimizer"):  # the training loop's own points
            kinds.append(phase)
        elif phase == "forward":
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


def _aligned(eager_keys: list[str], planned_keys: list[str]) -> list[tuple[str, int | None, int | None]]:
    """Merge two schedules of ``kind:node`` keys: ``(key, index in planned, index in eager)``,
    ``None`` where the step runs in only one of them. The plan's backward has extra
    recompute steps, eager's forward keeps a few values the plan drops."""
    merged: list[tuple[str, int | None, int | None]] = []
    matcher = difflib.SequenceMatcher(a=eager_keys, b=planned_keys, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            merged += [(planned_keys[j], j, i) for i, j in zip(range(i1, i2), range(j1, j2))]
        else:  # eager-only steps first, then plan-only ones
            merged += [(eager_keys[i], None, i) for i in range(i1, i2)]
            merged += [(planned_keys[j], j, None) for j in range(j1, j2)]
    return merged


def memory_timeline(plan) -> list[dict]:
    """The predicted live bytes through one training step, eager beside the plan.

    One row per step of forward then backward, merging the planned schedule with
    eager's (no checkpointing) by node: a step that runs in only one of them has
    ``None`` for the other's bytes. Each row is a dict:

    - ``step``: position (0, 1, ...); ``phase``: ``"forward"``, ``"loss"`` (the loss
      computed outside the model), ``"backward"`` or ``"optimizer"`` (``opt.step()``);
      ``node``: fx node name in the joint graph.
    - ``kind``: ``"input"`` (a parameter, buffer or input enters forward),
      ``"forward"`` (a forward op), ``"saved"`` (a value kept from forward is handed
      to backward), ``"tangent"`` (the gradient of a model output enters backward),
      ``"recompute"`` (backward rebuilds a value the plan did not keep),
      ``"gradient"`` (a backward op computing gradients), or ``"loss"`` and
      ``"optimizer"`` for the training loop's points.
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
    - ``region``: for a model that breaks the graph, the region the step belongs to
      (``"r1"``, ``"r2"``, ...: ``Plan.regions``); ``""`` otherwise and for placeholders.
    """
    decisions = {n.name: n for n in plan.nodes}
    forward_names = {p[1] for p in (*plan.timeline, *plan.baseline_timeline) if p[0] == "forward"}
    planned_kinds = _classify(plan.timeline, forward_names)
    eager_kinds = _classify(plan.baseline_timeline, forward_names)
    rows: list[dict] = []
    saved_so_far = 0
    for phase in ("forward", "loss", "backward", "optimizer"):
        planned = [(k, p) for k, p in zip(planned_kinds, plan.timeline) if p[0] == phase]
        eager = [(k, p) for k, p in zip(eager_kinds, plan.baseline_timeline) if p[0] == phase]
        merged = _aligned([f"{k}:{p[1]}" for k, p in eager], [f"{k}:{p[1]}" for k, p in planned])
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
                    "region": next((r.prefix[:-1] for r in plan.regions if node.startswith(r.prefix)), ""),
                }
            )
    return rows


# -- the plot ------------------------------------------------------------------------
def pyplot():
    """``matplotlib.pyplot``; ``ImportError`` saying how to install it when it is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or 'checkpoint-planner[plot]')") from e
    return plt


def _filled(values: list[int | None]) -> list[float]:
    """Carry the last known value over steps where a schedule does not run."""
    out, last = [], math.nan
    for v in values:
        last = v if v is not None else last
        out.append(last)
    return out


def _mark_phases(ax, n_fwd: int, n_steps: int, top: float) -> None:
    """A dotted line between forward and backward, labelled on both sides."""
    if 0 < n_fwd < n_steps:
        ax.axvline(n_fwd - 0.5, color="0.4", ls=":", lw=1)
        ax.text(n_fwd - 0.5, top * 1.02, "← forward ", ha="right", va="bottom", fontsize=8, color="0.3")
        ax.text(n_fwd - 0.5, top * 1.02, " backward →", ha="left", va="bottom", fontsize=8, color="0.3")


def _mark_regions(ax, rows: list[dict], top: float) -> None:
    """A faint line where each graph region starts (a model that breaks the graph), labelled with its name."""
    last = ""
    for i, r in enumerate(rows):
        if r["region"] and r["region"] != last:
            if i:
                ax.axvline(i - 0.5, color="0.75", lw=0.8)
            ax.text(i, top * 0.97, r["region"], ha="left", va="top", fontsize=7, color="0.45")
            last = r["region"]


def plot(plan, *, ax=None, title: str | None = None):
    """Draw :func:`memory_timeline`: eager vs the plan, the budget, the forward/backward
    boundary, what forward keeps for backward, where backward recomputes, and where
    each graph region starts (a model that breaks the graph).
    Returns the matplotlib ``Axes``."""
    plt = pyplot()
    # Placeholder steps (inputs, saved values, tangents) allocate nothing: leave them out.
    rows = [r for r in memory_timeline(plan) if r["kind"] in ("forward", "recompute", "gradient")]
    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    unit, size = byte_unit(max(plan.baseline_peak_bytes, plan.budget_bytes))
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
    _mark_phases(ax, n_fwd, len(rows), top)
    _mark_regions(ax, rows, top)
    ax.set_xlim(0, max(len(rows) - 1, 1))
    ax.set_xlabel("op of the training step, in the order it runs (forward, then backward)")
    ax.set_ylabel(f"predicted live {unit}")
    ax.set_title(title or f"{plan.model.class_name or 'model'}: predicted memory of one training step "
                 f"(plan recomputes {100 * plan.overhead:.1f}% of the FLOPs)", fontsize=10)
    if own_figure:
        ax.figure.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    else:
        ax.legend(fontsize=7.5)
    return ax
