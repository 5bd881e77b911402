"""planner.incremental: a moved schedule's peak from one simulation and the move's
window is the full simulation's, and the memory arrangement it speeds up makes the same
orders, writes into inputs and peaks as simulating every candidate move in full."""

from __future__ import annotations

import functools
import random
from dataclasses import replace

import pytest
import torch

from helpers import ResidualNet, tiny_gpt2
from planner.distributed import EngineBytes
from planner.incremental import MovePeaks, moved
from planner.joint_index import fast_schedule
from planner.order import _without_temps, arrange, check_order, improve_order
from planner.problem import build_problem
from planner.reuse import plan_reuse, profile_with_reuse
from planner.simulate import END_OF_BACKWARD, simulate
from planner.sqrt import solve_sqrt
from profiles import capture, profile_graph
from test_properties import _model as random_net

CASES = ("gpt2", "residual", "random3", "random7")


def _inputs(name):
    torch.manual_seed(0)
    if name == "gpt2":
        ids = torch.randint(0, 1000, (2, 32))
        return tiny_gpt2(layers=2, d=32, heads=2, vocab=1000, positions=32), {"input_ids": ids, "labels": ids}
    if name == "residual":
        return ResidualNet(d=32, blocks=3, hidden=64), {"x": torch.randn(64, 32), "target": torch.randint(0, 8, (64,))}
    return random_net(int(name.removeprefix("random")))


@functools.lru_cache(maxsize=None)
def _schedules(name):
    """``(profile, {label: schedule})``: recomputing nothing and sqrt(L)'s plan."""
    model, inputs = _inputs(name)
    joint = capture(model, inputs)
    gp = profile_graph(joint)
    sqrt = solve_sqrt(build_problem(gp).unarranged(), None).evaluation.recompute
    return gp, {"nothing": fast_schedule(joint, frozenset()), "sqrt": fast_schedule(joint, sqrt)}


@pytest.mark.parametrize("case", CASES)
def test_arrangement_is_the_same_as_simulating_each_move(case):
    gp, schedules = _schedules(case)
    for label, sched in schedules.items():
        top = simulate(gp, sched).peak_bytes
        for kw in ({}, {"granularity": 512, "engine": EngineBytes(forward=4096, backward=8192, end=1 << 16, optimizer=0)},
                   {"engine": EngineBytes(forward=top, backward=0, end=0, optimizer=0)}):  # the peak in forward
            fast = arrange(gp, sched, **kw)
            slow = arrange(gp, sched, incremental=False, **kw)
            assert fast.schedule == slow.schedule, (case, label, kw)
            assert fast.reuse == slow.reuse and fast.profile == slow.profile, (case, label, kw)
            assert (fast.before_bytes, fast.after_bytes) == (slow.before_bytes, slow.after_bytes), (case, label, kw)
        plain = _without_temps(gp)  # without writes into inputs too
        fast, fast_sim = improve_order(plain, sched)
        assert (fast, fast_sim) == improve_order(plain, sched, incremental=False), (case, label)


def test_the_cases_move_nodes():
    """The comparison above is not vacuous: some arrangements reorder the graphs."""
    moved_any = [arrange(gp, s).reordered for case in CASES[:2] for gp in [_schedules(case)[0]] for s in _schedules(case)[1].values()]
    assert any(b for _, b in moved_any), moved_any


def _valid_moves(gp, order, rng, count):
    """Up to ``count`` random moves of ``order`` that keep it valid (:func:`check_order`),
    some of them to or from the last position."""
    n, out = len(order.nodes), []
    for _ in range(50 * count):
        i = rng.randrange(n)
        j = n - 1 if rng.random() < 0.1 else min(n - 1, max(0, i + rng.randint(-60, 60)))
        if i == j:
            continue
        try:
            check_order(gp, order, moved(order, i, j))
        except ValueError:
            continue
        out.append((i, j))
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("case", CASES[:3])
def test_move_peaks_are_the_full_simulation(case):
    gp, schedules = _schedules(case)
    plain = _without_temps(gp)
    rng = random.Random(0)
    decided, phases = 0, set()
    for sched in schedules.values():
        for reuse in (True, False):
            memo: dict = {}
            rw = plan_reuse(plain, sched, memo=memo) if reuse else None
            profile = profile_with_reuse(plain, rw, memo=memo) if reuse else plain
            top = simulate(profile, sched).peak_bytes
            kws = [
                {"engine": EngineBytes(forward=0, backward=1024, end=top // 3, optimizer=0), "granularity": 512},
                # the peak in forward; the peak at the gradient reduction after backward
                {"engine": EngineBytes(forward=top, backward=0, end=0, optimizer=0)},
                {"engine": EngineBytes(forward=0, backward=0, end=2 * top, optimizer=0)},
                {},
            ]
            for kw in kws if reuse else kws[:1]:
                peaks = MovePeaks(plain, sched, profile, reuse=rw, memo=memo, **kw)
                assert peaks.result == simulate(profile, sched, track_peak=True, **kw)
                phases.add(peaks.result.peak_node if peaks.result.peak_node == END_OF_BACKWARD else peaks.result.peak_phase)
                for graph in ("forward", "backward"):
                    order = getattr(sched, graph)
                    for i, j in _valid_moves(gp, order, rng, 12):
                        cand = replace(sched, **{graph: moved(order, i, j)})
                        cand_rw = plan_reuse(plain, cand, memo=memo) if reuse else None
                        full = simulate(profile_with_reuse(plain, cand_rw, memo=memo) if reuse else plain, cand, **kw).peak_bytes
                        got = peaks.peak(graph, i, j)
                        # None exactly when the move changes a write into an input
                        assert (got is None) == (cand_rw != rw), (case, graph, i, j)
                        if got is None:
                            continue
                        decided += 1
                        assert got == full, (case, graph, i, j, kw)
                        # stopped at a level: at least it when the step reaches it, else the peak
                        for stop in (full, full + 1, peaks.result.peak_bytes):
                            stopped = peaks.peak(graph, i, j, stop_at=stop)
                            assert (stopped >= stop) if full >= stop else stopped == full, (case, graph, i, j, stop)
    assert decided >= 150, decided
    assert phases == {"forward", "backward", END_OF_BACKWARD}, phases
