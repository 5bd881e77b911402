"""The ILP's linear memory model and its two formulations, against the exact simulator."""

from __future__ import annotations

import dataclasses
import sys

import pulp
import pytest
import torch

import planner.ilp as ilp
from helpers import ResidualNet, tiny_gpt2
from planner.memory_model import refine
from planner.problem import build_problem
from planner.search import lowest_plan, search_ilp
from planner.sqrt import solve_sqrt
from profiles import capture, profile_graph


def _problem(case: str):
    torch.manual_seed(0)
    if case == "residual":  # BatchNorm (a multi-output op whose running statistics are outputs), dropout
        model, inputs = ResidualNet(d=32, blocks=3, hidden=64), {"x": torch.randn(64, 32), "target": torch.randint(0, 8, (64,))}
    else:
        ids = torch.randint(0, 128, (4, 64))
        model, inputs = tiny_gpt2(layers=2, d=64, heads=4, vocab=128, positions=64), {"input_ids": ids, "labels": ids}
    gp = profile_graph(capture(model, inputs), measure_temps=False)
    return build_problem(gp)


@pytest.fixture(scope="module", params=["residual", "gpt2"])
def prob(request):
    return _problem(request.param)


def test_linear_model_of_the_no_recompute_step_is_close_to_exact(prob):
    """With nothing recomputed the live intervals are known exactly; the linear
    model must then agree with the simulator (it once held every BatchNorm output
    for the whole step, 40% over). The model describes the partition's graphs; the
    runtime then arranges them for memory (planner.order.arrange), which the exact
    simulation of the chosen plan accounts for."""
    ev = prob.unarranged().evaluate(frozenset())
    model = prob.model_peak_of(ev)
    assert abs(model - ev.sim.peak_bytes) <= 0.03 * ev.sim.peak_bytes, (model, ev.sim.peak_bytes)


def test_dense_and_chained_memory_rows_give_the_same_optimum(prob, monkeypatch):
    """Small graphs use dense rows added lazily, big ones the sparse chained rows:
    the same model, so the same optimum (up to the solver's relative gap)."""
    base = prob.evaluate(frozenset()).sim.peak_bytes
    low = ilp.solve_ilp(prob, None, minimize_memory=True).model_peak
    budget = (low + base) / 2  # between the model's minimum and no recomputation
    dense = ilp.solve_ilp(prob, budget)
    monkeypatch.setattr(ilp, "_DENSE_LIMIT", 0)
    chained = ilp.solve_ilp(prob, budget)
    assert dense.recompute is not None and chained.recompute is not None
    assert chained.num_rows > dense.num_rows  # really the other formulation
    for res in (dense, chained):
        assert res.model_peak <= budget * (1 + 1e-6)
    assert chained.objective == pytest.approx(dense.objective, rel=2 * ilp._GAP, abs=1e-9)


def test_search_returns_a_plan_that_fits_and_is_no_costlier_than_sqrt(prob):
    """Between the lowest peak the planner finds and the no-recompute peak, the ILP
    search finds a plan within the budget, no costlier than sqrt(L)'s there."""
    base = prob.evaluate(frozenset()).sim.peak_bytes
    lowest, _ = lowest_plan(prob, 30.0)
    low = lowest.sim.peak_bytes
    assert low < base
    for frac in (0.6, 0.3):
        budget = int(low + frac * (base - low))
        sq = solve_sqrt(prob, budget).evaluation
        found = search_ilp(prob, budget, 30.0, start=sq if sq is not None else lowest)
        assert found is not None, f"no ILP plan at {budget} bytes (lowest {low}, no recompute {base})"
        ev, info = found
        assert ev.sim.peak_bytes <= budget
        if sq is not None:
            assert ev.cost_s <= sq.cost_s * (1 + 1e-9)


def _memory_state(prob):
    m = prob.memory
    return m, m.save.copy(), m.recompute.copy(), dict(m.need), dict(m.end)


def _assert_memory_state(prob, state):
    m, save, recompute, need, end = state
    assert prob.memory is m
    assert (m.save == save).all() and (m.recompute == recompute).all()
    assert dict(m.need) == need and dict(m.end) == end


def test_searches_leave_the_problem_as_given():
    """search_ilp and lowest_plan refine memory models of their own: the problem
    keeps its first estimates and objective, and a search gives the same plan
    whatever ran on the problem before."""
    prob = _problem("residual")
    flops = dataclasses.replace(prob, objective="flops")
    state = _memory_state(prob)
    lowest, _ = lowest_plan(flops, 30.0)  # minimises memory under the time objective internally
    assert flops.objective == "flops" and prob.objective == "time"
    _assert_memory_state(prob, state)
    base = prob.evaluate(frozenset()).sim.peak_bytes
    budget = int(lowest.sim.peak_bytes + 0.5 * (base - lowest.sim.peak_bytes))
    sq = solve_sqrt(prob, budget).evaluation
    assert sq is not None
    refined = refine(prob.memory, sq)
    assert refined is not prob.memory  # sqrt(L)'s exact intervals differ from the first estimates
    first = search_ilp(prob, budget, 30.0, start=sq, memory=refined)
    _assert_memory_state(prob, state)
    assert first is not None and first[0].sim.peak_bytes <= budget
    # the same searches again, after all the solves above, give the same plans
    assert search_ilp(prob, budget, 30.0, start=sq, memory=refined)[0].recompute == first[0].recompute
    assert lowest_plan(flops, 30.0)[0].recompute == lowest.recompute
    _assert_memory_state(prob, state)


def test_problem_and_memory_model_are_read_only(prob):
    with pytest.raises(dataclasses.FrozenInstanceError):
        prob.objective = "flops"
    with pytest.raises(ValueError, match="read-only"):
        prob.memory.save[0, 0] = 1.0
    with pytest.raises(TypeError):
        prob.memory.need[prob.memory.candidates[0]] = 0


def test_without_highs_the_ilp_uses_cbc_or_says_what_to_install(monkeypatch):
    """Without highspy the ILP runs on an installed CBC program (PuLP's
    ``COIN_CMD``, not the deprecated bundled ``PULP_CBC_CMD``: under ``-W error`` a
    DeprecationWarning would fail here), or the error names what to install."""
    monkeypatch.setitem(sys.modules, "highspy", None)  # ``import highspy`` raises ImportError
    if pulp.COIN_CMD().available():
        assert isinstance(ilp.solver_backend(5.0), pulp.COIN_CMD)
    else:
        with pytest.raises(ilp.NoMilpSolver, match="pip install highspy"):
            ilp.solver_backend(5.0)


def test_flops_objective_recomputes_no_more_flops_than_time_objective():
    """objective="flops" ranks plans by recomputed FLOPs first: at the same budget
    its plan recomputes no more FLOPs than the time objective's, and both fit."""
    prob_t = _problem("gpt2")
    gp = prob_t.gp
    prob_f = build_problem(gp, objective="flops")
    base = prob_t.evaluate(frozenset()).sim.peak_bytes
    low = lowest_plan(prob_t, 30.0)[0].sim.peak_bytes
    budget = int(low + 0.4 * (base - low))
    found = {}
    for name, prob in (("time", prob_t), ("flops", prob_f)):
        sq = solve_sqrt(prob, budget).evaluation
        res = search_ilp(prob, budget, 30.0, start=sq if sq is not None else lowest_plan(prob, 30.0)[0])
        assert res is not None
        found[name] = res[0]
        assert res[0].sim.peak_bytes <= budget
    assert found["flops"].flops <= found["time"].flops
    assert prob_f.rank(found["flops"])[0] == found["flops"].flops


def test_plan_records_and_checks_the_objective():
    import planner

    torch.manual_seed(0)
    model = ResidualNet(d=32, blocks=3, hidden=64)
    inputs = {"x": torch.randn(64, 32), "target": torch.randint(0, 8, (64,))}
    with pytest.raises(ValueError, match="objective"):
        planner.plan(model, 1.0, inputs, objective="memory")
    p = planner.plan(model, 1.0, inputs, objective="flops")
    assert p.solver.objective == "flops"
    assert planner.Plan.from_json(p.to_json()).solver.objective == "flops"


def test_solving_prints_nothing_to_stdout():
    """HiGHS prints a banner on its first use in a process (C level); a planner's
    caller whose stdout carries results must not get it."""
    import subprocess
    import sys

    code = (
        "import pulp\n"
        "from planner.ilp import solver_backend\n"
        "lp = pulp.LpProblem('x', pulp.LpMinimize)\n"
        "x = lp.add_variable('x', cat='Binary')\n"
        "lp += x\n"
        "lp += x >= 1\n"
        "lp.solve(solver_backend(5.0))\n"
        "print('solved', x.value())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "solved 1.0\n"
