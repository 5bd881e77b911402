"""planner.inspect (planner.view, planner.sweep, planner.units): the memory timeline and its plot, tables and HTML,
the summary, sweeps; runtime.tools.verify."""

from __future__ import annotations

import copy
import dataclasses
import html as html_lib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import planner
from planner import inspect as pi
from planner import units, view
from runtime.tools.verify import verify

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import residual_mlp  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model, inputs = residual_mlp()
    with planner.prepare(model, inputs) as step:  # one capture for both budgets
        full = step.plan(planner.GiB)
        p = step.plan(int(0.65 * full.baseline_peak_bytes))
    assert p.recomputed
    return model, inputs, full, p


def test_memory_timeline_holds_both_schedules(setup):
    _, _, _, p = setup
    rows = p.memory_timeline()
    assert rows == pi.memory_timeline(p)
    assert [r["step"] for r in rows] == list(range(len(rows)))
    planned = [r for r in rows if r["planned_bytes"] is not None]
    eager = [r for r in rows if r["eager_bytes"] is not None]
    # every point of both timelines appears once, in order
    assert [(r["phase"], r["node"], r["planned_bytes"]) for r in planned] == [tuple(t) for t in p.timeline]
    assert [(r["phase"], r["node"], r["eager_bytes"]) for r in eager] == [tuple(t) for t in p.baseline_timeline]
    assert max(r["planned_bytes"] for r in planned) == p.predicted_peak_bytes
    assert max(r["eager_bytes"] for r in eager) == p.baseline_peak_bytes
    phases = [r["phase"] for r in rows]
    assert phases == sorted(phases, key=["forward", "backward"].index)  # forward, then backward
    kinds = Counter(r["kind"] for r in rows)
    assert set(kinds) == {"input", "forward", "saved", "tangent", "recompute", "gradient"}
    # recompute steps are exactly the plan's recomputed values, in backward, and only in the plan
    rec = [r for r in rows if r["kind"] == "recompute"]
    assert {r["node"] for r in rec} == set(p.recomputed)
    assert all(r["phase"] == "backward" and r["eager_bytes"] is None for r in rec)
    by_name = {n.name: n for n in p.nodes}
    assert all(r["recomputed_bytes"] == by_name[r["node"]].bytes for r in rec)
    # what forward keeps for backward: the saved values' bytes, accumulated
    fwd = [r for r in rows if r["phase"] == "forward"]
    assert fwd[-1]["saved_bytes"] == sum(n.bytes for n in p.nodes if n.decision == "save")
    assert all(a["saved_bytes"] <= b["saved_bytes"] for a, b in zip(fwd, fwd[1:]))
    assert all(r["saved_bytes"] is None for r in rows if r["phase"] == "backward")
    assert {r["decision"] for r in fwd} == {"", "save", "recompute"}
    assert all(r["static_bytes"] == p.static_bytes for r in rows)


def test_timeline_of_a_plan_that_recomputes_nothing(setup):
    _, _, full, _ = setup
    rows = full.memory_timeline()
    assert all(r["planned_bytes"] == r["eager_bytes"] for r in rows)
    assert not any(r["kind"] == "recompute" for r in rows)


def test_plot_draws_eager_plan_budget_and_boundary(setup, tmp_path):
    _, _, _, p = setup
    ax = p.plot()
    labels = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert any(lab.startswith("eager, no checkpointing") for lab in labels)
    assert any(lab.startswith("plan, ilp") for lab in labels)
    assert any(lab.startswith("budget ") for lab in labels)
    assert any(lab.startswith("backward recomputes a value") for lab in labels)
    assert any(lab.startswith("kept for backward") for lab in labels)
    ys = [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert pytest.approx(p.budget_bytes / 2**20) in ys
    assert any(line.get_linestyle() == ":" for line in ax.get_lines())  # forward/backward boundary
    top = max(max(line.get_ydata()) for line in ax.get_lines() if line.get_label().startswith("eager"))
    assert top == pytest.approx(p.baseline_peak_bytes / 2**20)
    ax.figure.savefig(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000
    fig, axes = matplotlib.pyplot.subplots(1, 2)
    assert p.plot(ax=axes[1], title="mine") is axes[1] and axes[1].get_title() == "mine"
    matplotlib.pyplot.close("all")


def test_table_and_html(setup):
    _, _, _, p = setup
    text = pi.table(p, depth=1, top=4)
    assert "largest recomputed values (top 4 of" in text
    total = next(line for line in text.splitlines() if line.startswith("total"))
    saved_mib = sum(n.bytes for n in p.nodes if n.decision == "save") / 2**20
    assert f"{saved_mib:.3f}" in total
    html = p._repr_html_()
    assert html == pi.html(p)
    for words in ("predicted peak", "no-checkpoint peak", "per module", "blocks.0", "recompute", p.fingerprint):
        assert words in html
    assert "<script" not in html
    weird = planner.Plan.from_dict({**p.to_dict(), "nodes": [{**p.to_dict()["nodes"][0], "module": "<b>&x"}]})
    assert "&lt;b&gt;&amp;x" in weird._repr_html_()


def test_one_summary_for_the_plan_the_command_and_the_tables(setup):
    """Plan.summary(), str(plan), what `planner plan` prints, and the head of the table,
    the HTML and explain() are the same headline."""
    _, _, _, p = setup
    text = p.summary()
    assert str(p) == text == view.summary(p) == pi.summary(p)
    rows = view.headline(p)
    assert [line.split(":")[0] for line in text.splitlines()] == [k for k, _ in rows]
    assert [k for k, _ in rows] == ["model", "budget", "predicted peak", "no-checkpoint peak", "params+buffers+inputs",
                                    "recompute", "values for backward", "solver"]
    assert dict(rows)["budget"] == units.format_bytes(p.budget_bytes)
    assert pi.table(p).startswith(text + "\n\nper module (depth 2):\n")
    assert p.explain().startswith(text + "\n\nmodule ")
    html = p._repr_html_()
    for k, v in rows:
        assert f"<th style='text-align:left'>{html_lib.escape(k)}</th><td style='text-align:left'>{html_lib.escape(v)}</td>" in html


def test_inspect_reexports_view_sweep_and_units():
    assert pi.table is view.table and pi.plot is view.plot and pi.memory_timeline is view.memory_timeline
    assert pi.format_bytes is units.format_bytes and pi.sweep is planner.sweep.sweep
    assert set(pi.__all__) <= set(dir(pi)) and "verify" not in pi.__all__


def test_units():
    assert pi.format_bytes(1536) == "1.50 KiB"
    assert pi.format_bytes(3 * 2**30) == "3.00 GiB"
    assert pi.format_bytes(12) == "12 B"
    assert pi.format_bytes(-2048) == "-2.00 KiB"
    assert pi.format_flops(2.5e9) == "2.50 GFLOP"
    assert pi.format_flops(999) == "999 FLOP"
    assert pi.format_bytes(None) == "-" and pi.format_flops(None) == "-"
    assert units.byte_unit(4 * units.GiB) == ("GiB", units.GiB) and units.byte_unit(4 * units.GiB - 1) == ("MiB", units.MiB)
    assert units.percent(1, 8) == "12.5%" and units.percent(1, 0) == "-"
    assert planner.GiB == units.GiB == 2**30


def test_sweep_curve(setup, tmp_path):
    model, inputs, full, p = setup
    base = full.baseline_peak_bytes / planner.GiB
    curve = pi.sweep(model, inputs, budgets_gb=[0.2 * base, 0.65 * base, 1.1 * base])
    assert [pt.plan is None for pt in curve.points] == [True, False, False]
    assert "below the minimum budget" in curve.points[0].error
    assert curve.min_budget_bytes > 0.2 * full.baseline_peak_bytes
    assert curve.baseline_peak_bytes == full.baseline_peak_bytes
    mid, high = curve.points[1].plan, curve.points[2].plan
    assert {k: v for k, v in mid.to_dict().items() if k != "solver"} == {k: v for k, v in p.to_dict().items() if k != "solver"}
    assert high.recompute_flops == 0 and mid.recompute_flops > 0
    assert curve.rows[1]["overhead"] == mid.overhead and curve.rows[0]["predicted_peak_bytes"] is None
    text = curve.table()
    assert len(text.splitlines()) == 5 and "below the minimum" in text
    assert "<pre>" in curve._repr_html_()
    ax = curve.plot()
    assert ax.get_lines()[0].get_xydata().shape == (2, 2)
    ax.figure.savefig(tmp_path / "s.png")
    matplotlib.pyplot.close("all")
    with pytest.raises(ValueError, match="points"):
        pi.sweep(model, inputs, points=1)
    with pytest.raises(ValueError, match="budget_gb"):
        pi.sweep(model, inputs, budgets_gb=[-1.0])


def test_sweep_of_a_prepared_step_is_the_sweep_of_the_model(setup):
    """``pi.sweep(step, ...)`` on a step ``planner.prepare`` captured plans it without capturing
    again: the plans ``pi.sweep(model, ...)`` makes, with the sweep's solver; the options the
    capture fixed are refused."""
    model, inputs, full, p = setup
    base = full.baseline_peak_bytes / planner.GiB
    with planner.prepare(model, inputs, solver="sqrt") as step:
        curve = pi.sweep(step, budgets_gb=[0.2 * base, 0.65 * base])
        with pytest.raises(ValueError, match="target, loss_fn were fixed when the step was captured"):
            pi.sweep(step, budgets_gb=[base], target="cpu", loss_fn=lambda out: out)
    assert curve.points[0].plan is None and "below the minimum budget" in curve.points[0].error
    mid = curve.points[1].plan
    assert {k: v for k, v in mid.to_dict().items() if k != "solver"} == {k: v for k, v in p.to_dict().items() if k != "solver"}
    assert (curve.model_class, curve.solver) == (type(model).__name__, "auto")
    assert curve.table().startswith(f"{type(model).__name__}: no-checkpoint peak")


def test_verify_matches_eager_and_leaves_the_model_alone(setup):
    model, inputs, _, p = setup
    before = copy.deepcopy(model.state_dict())
    v = verify(model, inputs, p)
    assert v.ok and v.within_budget and v.grads_equal, v.summary()
    assert v.measured_recompute_flops == p.recompute_flops
    assert v.measured_step_flops == pytest.approx(p.total_flops, rel=0.02)
    assert abs(v.measured_peak_bytes - p.predicted_peak_bytes) <= 0.05 * v.measured_peak_bytes
    assert v.loss_planned == v.loss_eager
    assert "verdict:   OK" in v.summary()
    assert all(p_.grad is None for p_ in model.parameters())
    for k, t in model.state_dict().items():
        torch.testing.assert_close(t, before[k])
    bad = dataclasses.replace(v, mismatched=("head.weight",), max_grad_diff=0.5)
    assert not bad.ok and "DIFFER" in bad.summary() and "verdict:   FAILED" in bad.summary()


def test_verify_a_per_rank_plan_compares_the_one_process_step(setup):
    """verify runs one process: a per-rank plan's step is compared with the plan's
    prediction for the step alone, and the budget check adds the engine's most."""
    from planner.distributed import Distributed, engine_bytes

    model, inputs, full, _ = setup
    kw = {"world_size": 2, "sharding": "fsdp", "optimizer": "adamw"}
    engine = engine_bytes(model, Distributed(**kw))
    p = planner.plan(model, (engine.held + 0.65 * full.baseline_peak_bytes) / planner.GiB, inputs, **kw)
    assert p.recomputed
    v = verify(model, inputs, p)
    assert v.per_rank and v.predicted_step_bytes < v.predicted_peak_bytes
    assert abs(v.measured_peak_bytes - v.predicted_step_bytes) <= 0.05 * v.measured_peak_bytes, v.summary()
    assert v.ok and v.predicted_peak_bytes <= v.checked_peak_bytes <= p.budget_bytes, v.summary()
    assert "without the engine" in v.summary() and "per rank:" in v.summary()
    over = dataclasses.replace(v, measured_peak_bytes=v.predicted_step_bytes + p.budget_bytes)
    assert not over.within_budget and "OVER budget" in over.summary()
