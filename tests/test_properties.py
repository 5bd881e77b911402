"""Property tests on random models built from a seed (hypothesis, derandomized).

Each model mixes residual MLPs, two-way branches merged by add, multiply or
concat, LayerNorm/BatchNorm, dropout and in-place ops. For every one:

- at several budgets (the no-recomputation peak, and two below it, or the
  planner's minimum when below that), the applied plan's outputs, loss, gradients and buffers
  equal eager's, the measured peak is within the budget, and the predicted peak is
  within 5% of the measured one;
- the sqrt and ILP solvers never return a plan the simulator finds over budget, and
  the ILP plan never recomputes at a higher cost than the sqrt plan;
- planning is deterministic, and ``Plan.from_json(p.to_json()) == p``.

Kept cheap: tiny models, a few examples each (a capture is seconds on 2 cores).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

import planner
import runtime
from helpers import assert_same_step, measured_step_peak
from planner.problem import build_problem
from profiles import capture, profile_graph
from profiles.signature import describe_inputs, parameter_signature

from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

# When an example fails, hypothesis' pytest plugin imports libcst to suggest a patch,
# and libcst's import warns (DeprecationWarning from mypy_extensions); under -W error
# that would abort the session instead of reporting the failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

KINDS = ("mlp", "branch", "norm", "dropout", "inplace")
ACTS = {"gelu": nn.functional.gelu, "relu": torch.relu, "tanh": torch.tanh}


class RandomNet(nn.Module):
    """A random stack of blocks on a ``[batch, d]`` input; the output is a scalar loss."""

    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        d = self.d = rng.choice((16, 24, 32))
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList()
        self.spec: list[tuple[str, str]] = []
        for _ in range(rng.randint(3, 6)):
            kind = rng.choice(KINDS)
            m = nn.Module()
            if kind == "mlp":
                hidden = rng.choice((2, 4)) * d
                m.a, m.b = nn.Linear(d, hidden), nn.Linear(hidden, d)
                variant = rng.choice(sorted(ACTS))
            elif kind == "branch":
                variant = rng.choice(("add", "mul", "cat"))
                m.a, m.b = nn.Linear(d, d), nn.Linear(d, d)
                if variant == "cat":
                    m.c = nn.Linear(2 * d, d)
            elif kind == "norm":
                variant = rng.choice(("layer", "batch"))
                m.n = nn.LayerNorm(d) if variant == "layer" else nn.BatchNorm1d(d)
            elif kind == "dropout":
                variant = ""
                m.a, m.drop = nn.Linear(d, d), nn.Dropout(rng.choice((0.1, 0.3)))
            else:
                variant = rng.choice(("relu_", "mul_", "add_"))
                m.a = nn.Linear(d, d)
            self.blocks.append(m)
            self.spec.append((kind, variant))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for m, (kind, variant) in zip(self.blocks, self.spec):
            if kind == "mlp":
                h = h + m.b(ACTS[variant](m.a(h)))
            elif kind == "branch":
                a, b = torch.tanh(m.a(h)), m.b(h)
                if variant == "add":
                    h = h + a + b
                elif variant == "mul":
                    h = h + a * b
                else:
                    h = h + m.c(torch.cat([a, b], dim=-1))
            elif kind == "norm":
                h = m.n(h)
            elif kind == "dropout":
                h = h + m.drop(torch.relu(m.a(h)))
            else:
                y = m.a(h)
                getattr(y, variant)(*(() if variant == "relu_" else (0.5,)))
                h = h + y
        return self.head(h).square().mean()


def _model(seed: int):
    torch.manual_seed(seed)
    model = RandomNet(seed)
    batch = random.Random(seed + 1).choice((64, 128, 256))
    return model, (torch.randn(batch, model.d),)


def _profiled(model, inputs):
    joint = capture(model, inputs)
    gp = profile_graph(joint)
    info = planner.ModelInfo(
        fingerprint=joint.fingerprint,
        class_name=type(model).__name__,
        inputs=describe_inputs(inputs, {}),
        structure=joint.structure,
        graph=joint.node_digests,
        parameters=parameter_signature(model),
    )
    return gp, info


def _plan_or_min(gp, budget: int, info, **kw) -> planner.Plan:
    try:
        return planner.plan_profile(gp, budget, model_info=info, **kw)
    except planner.BudgetTooSmall as e:
        return planner.plan_profile(gp, e.min_budget_bytes, model_info=info, **kw)


PROPS = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPS
@given(seed=st.integers(0, 2**31 - 1))
def test_applied_plans_are_exact_within_budget_and_predicted(seed):
    model, inputs = _model(seed)
    note(f"blocks: {model.spec}")
    gp, info = _profiled(model, inputs)
    baseline = planner.plan_profile(gp, 2**40, model_info=info).baseline_peak_bytes
    # 1.0: exactly the no-recomputation peak, where a plan keeps no safety margin (every
    # byte counts, the loss's one-element seed gradient included).
    for fraction in (1.0, 0.75, 0.5):
        p = _plan_or_min(gp, int(baseline * fraction), info)
        assert p.predicted_peak_bytes <= p.budget_bytes
        wrapped, planned_model = assert_same_step(model, lambda m: runtime.apply(m, p), inputs)
        measured = measured_step_peak(wrapped, planned_model, inputs)
        where = f"seed {seed} {model.spec} at {fraction} ({p.solver.name}, {len(p.recomputed)} recomputed)"
        assert measured <= p.budget_bytes, f"{where}: measured {measured} > budget {p.budget_bytes}"
        assert abs(p.predicted_peak_bytes - measured) <= 0.05 * measured, f"{where}: predicted {p.predicted_peak_bytes}, measured {measured}"


@settings(PROPS, max_examples=8)
@given(seed=st.integers(0, 2**31 - 1))
@example(seed=43340)  # a near-tie at 0.85 between the ILP's and sqrt(L)'s plans: the ILP must not come out costlier
def test_solvers_stay_within_budget_ilp_no_costlier_deterministic_round_trip(seed):
    model, inputs = _model(seed)
    gp, info = _profiled(model, inputs)
    check = build_problem(gp)  # an independent simulator for every plan below
    baseline = check.evaluate(frozenset()).sim.peak_bytes
    for fraction in (0.85, 0.7, 0.55):
        budget = int(baseline * fraction)
        found = {}
        for solver in ("sqrt", "ilp"):
            try:
                p = planner.plan_profile(gp, budget, solver=solver, model_info=info)
            except planner.BudgetTooSmall as e:
                assert e.min_budget_bytes > budget, (seed, solver, fraction, e.min_budget_bytes, budget)
            else:
                found[solver] = p
                peak = check.evaluate(frozenset(p.recomputed)).sim.peak_bytes
                assert peak == p.predicted_peak_bytes <= budget, (seed, solver, fraction, peak, budget)
                assert planner.Plan.from_json(p.to_json()) == p
        if "sqrt" in found:
            assert "ilp" in found, f"seed {seed}: ilp found no plan where sqrt did ({fraction})"
            ilp, sq = found["ilp"], found["sqrt"]
            assert ilp.recompute_time_s <= sq.recompute_time_s + 1e-12, (
                f"seed {seed} {model.spec} at {fraction} (budget {budget}): ilp recomputes {ilp.recompute_time_s:.4g} s "
                f"(peak {ilp.predicted_peak_bytes}), sqrt {sq.recompute_time_s:.4g} s (peak {sq.predicted_peak_bytes})"
            )
        if found:
            solver, p = next(iter(found.items()))
            again = planner.plan_profile(gp, budget, solver=solver, model_info=info)
            strip = lambda q: {k: v for k, v in q.to_dict().items() if k != "solver"}  # noqa: E731
            assert strip(again) == strip(p) and again.solver.name == p.solver.name
