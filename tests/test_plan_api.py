"""The Plan type, plan()'s argument checks, solvers, FLOPs and fingerprints."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import planner
import runtime
from helpers import ResidualNet, TiedNet, measured_step_peak, run_step
from planner.problem import build_problem
from planner.sqrt import solve_sqrt
from profiles import capture, profile_graph


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ResidualNet(d=32, blocks=4, hidden=128)
    inputs = {"x": torch.randn(256, 32), "target": torch.randint(0, 8, (256,))}
    probe = copy.deepcopy(model)
    eager = measured_step_peak(probe, probe, inputs)
    return model, inputs, eager


@pytest.fixture(scope="module")
def plan70(setup):
    """``planner.plan`` at 70% of eager's measured peak: the plan several tests read (each reads, none changes it)."""
    model, inputs, eager = setup
    return planner.plan(model, 0.7 * eager / planner.GiB, inputs)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), 1e9])
def test_bad_budgets_are_value_errors(setup, bad):
    model, inputs, _ = setup
    with pytest.raises(ValueError, match="budget_gb"):
        planner.plan(model, bad, inputs)


@pytest.mark.parametrize("bad", ["1", None, True, [1.0]])
def test_non_numeric_budgets_are_type_errors(setup, bad):
    model, inputs, _ = setup
    with pytest.raises(TypeError, match="budget_gb"):
        planner.plan(model, bad, inputs)


def test_unknown_solver(setup):
    model, inputs, _ = setup
    with pytest.raises(ValueError, match="unknown solver 'magic'"):
        planner.plan(model, 1.0, inputs, solver="magic")


def test_missing_example_inputs_says_what_to_do(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="example_input_array"):
        planner.plan(model, 1.0)


def test_example_input_array_is_used():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model.example_input_array = torch.randn(4, 8)
    with pytest.warns(planner.LossNotCountedWarning, match="loss_fn="):  # its output is (4, 1), not a loss
        p = planner.plan(model, 1.0)
    assert p.model.inputs == (("0", (4, 8), "float32"),)
    assert p.to_dict()["model"]["inputs"] == [["0", [4, 8], "float32"]]


def test_model_and_distributed_are_records(setup):
    """``Plan.model`` is a ModelInfo (JSON arrays as tuples, ``class`` as ``class_name``),
    ``Plan.distributed`` None for one process; plan_profile without a model record
    writes only the fingerprint, and refuses a dict."""
    model, inputs, _ = setup
    info = planner.ModelInfo(fingerprint="ab", class_name="M", inputs=[["x", [2, 3], "float32"], ["k", None, "int"]],
                             graph=["0a1b2c"], parameters=[["w", [3], "float32", True]])
    assert info.inputs == (("x", (2, 3), "float32"), ("k", None, "int")) and info.graph == ("0a1b2c",)
    assert info.to_dict() == {"fingerprint": "ab", "class": "M", "inputs": [["x", [2, 3], "float32"], ["k", None, "int"]],
                              "graph": ["0a1b2c"], "parameters": [["w", [3], "float32", True]]}
    assert planner.ModelInfo.from_dict(info.to_dict()) == info
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.fingerprint = "cd"
    p = planner.plan(model, 1.0, inputs)
    assert isinstance(p.model, planner.ModelInfo) and p.distributed is None and "distributed" not in p.to_dict()
    assert p.model.class_name == "ResidualNet" and p.model.structure and len(p.model.graph) > 0
    gp = profile_graph(capture(model, inputs))
    bare = planner.plan_profile(gp, 2**40)
    assert bare.to_dict()["model"] == {"fingerprint": gp.joint.fingerprint} == {"fingerprint": p.fingerprint}
    with pytest.raises(TypeError, match="model_info must be a planner.ModelInfo"):
        planner.plan_profile(gp, 2**40, model_info={"fingerprint": p.fingerprint})
    with pytest.raises(ValueError, match="'distributed' must be None"):
        dataclasses.replace(p, distributed={}).check()


def test_budget_too_small_names_the_minimum(setup):
    model, inputs, _ = setup
    with pytest.raises(planner.BudgetTooSmall) as info:
        planner.plan(model, 1e-6, inputs)
    e = info.value
    assert isinstance(e, ValueError)
    assert e.min_budget_bytes > 1e-6 * planner.GiB
    assert f"{e.min_budget_bytes / planner.GiB:.4f} GiB" in str(e)
    # and the minimum itself can be planned for
    p = planner.plan(model, e.min_budget_bytes / planner.GiB, inputs)
    assert p.predicted_peak_bytes <= e.min_budget_bytes


def test_plan_fields_json_round_trip_and_explain(plan70, tmp_path):
    p = plan70
    assert p.solver.name == "ilp" and p.solver.seconds >= 0
    assert p.baseline_peak_bytes > p.predicted_peak_bytes
    assert p.total_flops > 0 and 0 <= p.recompute_flops < p.total_flops
    assert {n.decision for n in p.nodes} <= {"save", "recompute"}
    assert any(n.module.startswith("blocks.") for n in p.nodes)
    path = tmp_path / "plan.json"
    text = p.to_json(path)
    assert planner.Plan.from_json(path) == p
    assert planner.Plan.from_json(text) == p
    out = p.explain()
    assert "blocks" in out and "recompute" in out
    with pytest.raises(ValueError, match="truncated or invalid"):
        planner.Plan.from_json(text[: len(text) // 2])
    with pytest.raises(ValueError, match="schema version"):
        planner.Plan.from_json(text.replace(f'"schema_version": {planner.SCHEMA_VERSION}', '"schema_version": 99'))


def test_plans_are_deterministic(setup, plan70, capsys):
    """The same plan from two calls, and from one captured step planned at two budgets
    (the step profiled once per dropout mode, for all its plans)."""
    model, inputs, eager = setup
    a = plan70
    b = planner.plan(model, 0.7 * eager / planner.GiB, inputs)
    capsys.readouterr()
    with planner.prepare(model, inputs, progress=True) as step:
        low = step.plan(int(0.6 * eager))
        c = step.plan(int(0.7 * eager))
        sq = step.plan(int(0.7 * eager), solver="sqrt")
        with pytest.raises(ValueError, match="unknown solver"):
            step.plan(int(0.7 * eager), solver="fast")
    log = capsys.readouterr().err
    assert log.count("profiling (dropout: mask)") == log.count("profiling (dropout: replay)") == 1, log
    assert sq.solver.name == "sqrt" and sq.recompute_time_s >= c.recompute_time_s
    strip = lambda p: {k: v for k, v in p.to_dict().items() if k != "solver"}  # noqa: E731
    assert strip(a) == strip(b) == strip(c)
    assert low.predicted_peak_bytes < c.predicted_peak_bytes
    with pytest.raises(RuntimeError, match="closed"):
        step.plan(int(0.7 * eager))


def test_ilp_never_costs_more_than_sqrt(setup):
    """At two budgets: the ILP plan recomputes at no more cost than sqrt(L)'s on the same
    problem; ``solver="sqrt"`` gives sqrt(L)'s plan, within the budget. The step is captured
    once (``planner.prepare``: the plans ``planner.plan`` makes, see test_plans_are_deterministic)."""
    model, inputs, eager = setup
    gp = profile_graph(capture(model, inputs))
    prob = build_problem(gp)
    with planner.prepare(model, inputs) as step:
        for frac in (0.8, 0.65):
            budget = int(frac * eager)
            sq = solve_sqrt(prob, budget)
            assert sq.evaluation is not None, f"sqrt(L) found no plan at {frac} of eager's peak"
            p = step.plan(budget, solver="ilp")
            assert p.recompute_time_s <= sq.evaluation.cost_s + 1e-12
            s = step.plan(budget, solver="sqrt")
            assert s.solver.name == "sqrt" and s.predicted_peak_bytes <= budget


def test_recompute_flops_are_what_runs():
    """The backward graph the runtime runs recomputes exactly the plan's FLOPs, and
    the plan's step FLOPs are what FlopCounterMode counts for eager.

    (FlopCounterMode cannot wrap the compiled module itself: dynamo refuses to run
    under a non-infra dispatch mode, so the runtime's graphs are counted instead.)"""
    from profiles.nodes import node_flops

    torch.manual_seed(0)
    model = TiedNet(vocab=100, d=32, layers=3)
    inputs = (torch.randint(0, 100, (16, 64)),)
    with pytest.raises(planner.BudgetTooSmall) as info:
        planner.plan(model, 1e-6, inputs)
    p = planner.plan(model, info.value.min_budget_bytes / planner.GiB, inputs)
    assert p.recompute_flops > 0
    m_e = copy.deepcopy(model)
    with FlopCounterMode(display=False) as fc:
        run_step(m_e, inputs)
    assert math.isclose(p.total_flops, fc.get_total_flops(), rel_tol=0.02)
    wrapped = runtime.apply(copy.deepcopy(model), p)
    run_step(wrapped, inputs)
    (fwd, bwd), = wrapped.compiled_graphs
    saved_names = {a.name for a in fwd.graph.find_nodes(op="output")[0].all_input_nodes}
    recomputed = [n for n in bwd.graph.nodes if n.op == "call_function" and n.name in set(p.recomputed)]
    assert sum(node_flops(n) for n in recomputed) == p.recompute_flops
    assert not any(n.name in saved_names for n in recomputed), "a recomputed value is also saved"


def test_plan_for_other_model_is_refused(setup, plan70):
    model, inputs, eager = setup
    p = plan70
    other = ResidualNet(d=32, blocks=3, hidden=128)
    with pytest.raises(runtime.PlanMismatch, match="another model"):  # its parameters differ: refused at apply
        run_step(runtime.apply(other, p), inputs)


def test_eval_and_no_grad_run_the_original_model(setup, plan70):
    model, inputs, eager = setup
    p = plan70
    m = copy.deepcopy(model)
    wrapped = runtime.apply(m, p)
    assert list(wrapped.parameters()) == list(m.parameters())
    wrapped.eval()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(**inputs)["logits"], m(**inputs)["logits"])


def test_prepare_takes_what_plan_takes_but_the_budget():
    """``plan()`` forwards its keywords to ``prepare()``: both list them, with the same defaults."""
    plan_params = dict(inspect.signature(planner.plan).parameters)
    del plan_params["budget_gb"]
    assert plan_params == dict(inspect.signature(planner.prepare).parameters)
