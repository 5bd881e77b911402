"""The block ILP: repeated blocks found in the joint graph, their copies sharing
decisions; its plans checked by the exact simulator against the flat ILP's."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

import planner
from helpers import tiny_gpt2
from planner.api import plan_profile
from planner.block_ilp import BlockIlp, block_layouts, block_solver
from planner.blocks import find_blocks
from planner.ilp import _GAP
from planner.memory_model import refine
from planner.problem import build_problem
from planner.search import lowest_plan, search_ilp
from planner.sqrt import solve_sqrt
from profiles import capture, profile_graph

LAYERS = 4


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 64))
    model = tiny_gpt2(layers=LAYERS, d=64, heads=4, vocab=128, positions=64)
    gp = profile_graph(capture(model, {"input_ids": ids, "labels": ids}), measure_temps=False)
    return gp, build_problem(gp)


def test_finds_the_transformer_layers_as_copies_of_one_block(gpt2):
    gp, prob = gpt2
    blocks = find_blocks(gp)
    assert [b.path for b in blocks.blocks] == [f"transformer.h.{i}" for i in range(LAYERS)]
    assert len(blocks.kinds) == 1
    assert blocks.coverage > 0.5
    ops = [[gp.nodes[n].op for n in b.forward] for b in blocks.blocks]
    assert all(o == ops[0] for o in ops)
    (layout,) = block_layouts(prob, blocks)
    assert len(layout.blocks) >= LAYERS - 1  # the last may differ (its output is the model's)


def test_block_plans_are_exact_within_budget_and_no_costlier_than_flat(gpt2):
    """At budgets from tight to loose, the block ILP's plan (found by the same
    search, checked by exact simulation) fits and costs no more than the flat
    ILP's, up to the solvers' relative MIP gap."""
    _, prob = gpt2
    base = prob.evaluate(frozenset()).sim.peak_bytes
    low = lowest_plan(prob, 30.0)[0].sim.peak_bytes
    layouts = block_layouts(prob, find_blocks(prob.gp))
    for frac in (0.15, 0.5):
        budget = int(low + frac * (base - low))
        sq = solve_sqrt(prob, budget).evaluation
        memory = refine(prob.memory, sq) if sq is not None else prob.memory
        flat, _ = search_ilp(prob, budget, 30.0, start=sq, memory=memory)
        blocks, info = search_ilp(prob, budget, 30.0, start=sq, memory=memory, solve=BlockIlp(prob, layouts))
        assert blocks.sim.peak_bytes <= budget
        assert prob.evaluate(blocks.recompute).sim.peak_bytes == blocks.sim.peak_bytes
        assert blocks.cost_s <= flat.cost_s * (1 + 2 * _GAP), (frac, blocks.cost_s, flat.cost_s, info)


def test_block_solves_are_deterministic_and_share_decisions(gpt2):
    _, prob = gpt2
    layouts = block_layouts(prob, find_blocks(prob.gp))
    solve = BlockIlp(prob, layouts, groups=1, tail=0)
    base = prob.evaluate(frozenset()).sim.peak_bytes
    first = solve(prob, 0.7 * base)
    second = BlockIlp(prob, layouts, groups=1, tail=0)(prob, 0.7 * base)
    assert first.recompute is not None and first.recompute == second.recompute
    # one group: every copy recomputes the same positions
    (layout,) = layouts
    positions = {frozenset(i for i, n in enumerate(b.forward) if n in first.recompute) for b in layout.blocks}
    assert len(positions) == 1 and first.recompute


def test_auto_solves_block_by_block_only_for_deep_models(gpt2):
    _, prob = gpt2
    assert block_solver(prob, always=False) is None  # 4 layers: the flat ILP
    assert isinstance(block_solver(prob, always=False, min_copies=LAYERS - 1), BlockIlp)
    assert isinstance(block_solver(prob, always=True), BlockIlp)


def test_plan_records_the_backend_and_the_blocks(gpt2):
    gp, prob = gpt2
    base = prob.evaluate(frozenset()).sim.peak_bytes
    schema = json.loads((Path(__file__).parents[1] / "docs" / "plan.schema.json").read_text())
    for solver in ("blocks", "ilp", "sqrt"):
        p = plan_profile(gp, int(0.8 * base), solver=solver)
        d = json.loads(p.to_json())
        jsonschema.validate(d, schema)
        assert planner.Plan.from_dict(d) == p
        if solver == "sqrt":
            assert p.solver.name == "sqrt" and "backend" not in d["solver"]
        else:
            assert p.solver.name == "ilp" and d["solver"]["backend"] == "highs"
            assert ("blocks:" in p.solver.status) == (solver == "blocks")
