"""planner.order and planner.reuse: the step's graphs arranged for memory compute the
same values, keep random ops in order, never peak higher, and run as simulated."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import runtime
from helpers import assert_same_step, measured_step_peak, tiny_gpt2
from planner import plan_profile
from planner.order import arrange, check_order, greedy_schedule, reorder_graph
from planner.problem import build_problem
from planner.reuse import OUT_VARIANTS, apply_reuse
from planner.joint_index import fast_schedule
from planner.schedule import GraphOrder, schedule_of
from planner.simulate import simulate
from planner.sqrt import solve_sqrt
from planner.trim import MAX_ARRANGED, keep_aliases, trim
from profiles import capture, measure_peak, profile_graph
from profiles._torch_private import make_boxed
from runtime.partition import split_joint


def _case(name):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 32))
    return tiny_gpt2(layers=1, d=32, heads=2, vocab=1000, positions=32), {"input_ids": ids, "labels": ids}


@functools.lru_cache(maxsize=None)
def _profiled(name):
    """``(joint, profile)`` of a case, captured once for the tests that only read them."""
    model, inputs = _case(name)
    joint = capture(model, inputs, dropout="mask")
    return joint, profile_graph(joint)


@functools.lru_cache(maxsize=None)
def _recompute_sets(name):
    _, gp = _profiled(name)
    prob = build_problem(gp).unarranged()  # sqrt's plan for the graphs as split
    return {"nothing": frozenset(), "sqrt": solve_sqrt(prob, None).evaluation.recompute}


@pytest.mark.parametrize("case", ["gpt2"])
def test_arranged_schedules_are_valid_and_never_peak_higher(case):
    joint, gp = _profiled(case)
    for label, recompute in _recompute_sets(case).items():
        sched = fast_schedule(joint, recompute)
        arr = arrange(gp, sched)
        check_order(gp, sched.forward, arr.schedule.forward)
        check_order(gp, sched.backward, arr.schedule.backward)
        assert arr.before_bytes == simulate(gp, sched).peak_bytes
        assert arr.after_bytes == simulate(arr.profile, arr.schedule).peak_bytes
        assert arr.after_bytes <= arr.before_bytes, f"{case}/{label}"
        inputs_of = {n for order in (sched.forward, sched.backward) for n, op, _ in order.nodes if op == "placeholder"}
        outputs = set(sched.forward.outputs) | set(sched.backward.outputs)
        for n, a in {**arr.reuse.forward, **arr.reuse.backward}.items():
            assert a not in inputs_of and a not in outputs, f"{case}/{label}: {n} writes into {a}"


def test_reuse_lowers_the_no_checkpoint_peak_of_a_language_model():
    joint, gp = _profiled("gpt2")
    sched = fast_schedule(joint, frozenset())
    arr = arrange(gp, sched)
    # the peak is in the loss's backward, where the log-softmax backward writes into
    # the NLL gradient: about one logits-sized buffer fewer
    logits = 2 * 32 * 1000 * 4
    assert arr.after_bytes <= arr.before_bytes - 0.9 * logits, (arr.before_bytes, arr.after_bytes)
    assert "_log_softmax_backward_data" in arr.reuse.backward


def test_check_order_rejects_invalid_orders():
    joint, gp = _profiled("gpt2")
    sched = fast_schedule(joint, frozenset())
    nodes = list(sched.forward.nodes)
    first_call = next(i for i, (_, op, _) in enumerate(nodes) if op == "call_function")
    with pytest.raises(ValueError, match="runs before its input"):
        check_order(gp, sched.forward, GraphOrder(nodes=tuple(nodes[:first_call] + nodes[first_call:][::-1]), outputs=sched.forward.outputs))
    randoms = [i for i, (n, op, _) in enumerate(nodes) if op == "call_function" and not gp.nodes[n].recomputable]
    assert len(randoms) >= 2  # GPT-2's dropouts
    i, j = randoms[0], randoms[1]
    swapped = nodes[:]
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(ValueError):
        check_order(gp, sched.forward, GraphOrder(nodes=tuple(swapped), outputs=sched.forward.outputs))


def test_greedy_order_is_a_valid_order():
    joint, gp = _profiled("gpt2")
    sched = fast_schedule(joint, frozenset())
    greedy = greedy_schedule(gp, sched)
    check_order(gp, sched.forward, greedy.forward)
    check_order(gp, sched.backward, greedy.backward)


def _run(fwd, bwd, primals, saved_count):
    """Forward then backward, boxed as the runtime runs them; the loss's gradient
    is one, the other outputs' zero."""
    tangents = []
    for n in bwd.graph.find_nodes(op="placeholder"):
        if n.name.startswith("tangents"):
            val = n.meta["val"]
            tangents.append(torch.ones(val.shape, dtype=val.dtype) if val.numel() == 1 else torch.zeros(val.shape, dtype=val.dtype))
    run_fwd, run_bwd = make_boxed(fwd), make_boxed(bwd)
    torch.manual_seed(0)
    outs = run_fwd(list(primals))
    user, saved = outs[: len(outs) - saved_count], outs[len(outs) - saved_count:]
    return [*user, *run_bwd(list(saved) + tangents)]


@pytest.mark.parametrize("case", ["gpt2"])
def test_arranged_graphs_compute_the_same_bits(case):
    """sqrt(L)'s plan: recomputation, reordering and ops writing into inputs together."""
    joint, gp = _profiled(case)
    primals = [p.detach() for p in joint.primal_values]
    fwd, bwd, saved = split_joint(joint, _recompute_sets(case)["sqrt"])
    arr = arrange(gp, schedule_of(fwd, bwd))
    assert arr.reuse.forward or arr.reuse.backward, case
    fwd2, bwd2 = copy.deepcopy(fwd), copy.deepcopy(bwd)
    if arr.reordered[0]:
        fwd2 = reorder_graph(fwd2, arr.schedule.forward)
    if arr.reordered[1]:
        bwd2 = reorder_graph(bwd2, arr.schedule.backward)
    apply_reuse(fwd2, arr.reuse.forward)
    apply_reuse(bwd2, arr.reuse.backward)
    a = _run(fwd, bwd, primals, len(saved))
    b = _run(fwd2, bwd2, primals, len(saved))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y), case


def test_language_model_at_eager_peak_runs_as_simulated_recomputing_nothing():
    """At a budget of eager's own peak the planner recomputes nothing, and the
    arranged step it runs measures its prediction with eager's gradients."""
    model, inputs = _case("gpt2")
    probe = copy.deepcopy(model)
    eager_peak = measured_step_peak(probe, probe, inputs)
    # what planner.plan does after capturing (dropout masks kept), on the case's capture
    p = plan_profile(_profiled("gpt2")[1], eager_peak)
    assert p.recomputed == [] and p.baseline_peak_bytes <= eager_peak, (p.recomputed, p.baseline_peak_bytes, eager_peak)
    wrapped, planned_model = assert_same_step(model, lambda m: runtime.apply(m, p), inputs)
    measured = measured_step_peak(wrapped, planned_model, inputs)
    # never above the prediction (64 B: allocator events outside the step's graphs),
    # and within 0.5% of it (op temporaries are measured on synthetic inputs)
    assert p.predicted_peak_bytes - 0.005 * measured <= measured <= p.predicted_peak_bytes + 64, (measured, p.predicted_peak_bytes)
    # the backward it ran writes into dying inputs (the loss's log-softmax backward among them)
    out_ops = {op for op, _ in OUT_VARIANTS.values()}
    assert any(n.target in out_ops for _, bwd in wrapped.compiled_graphs for n in bwd.graph.nodes)


def test_trim_keeps_what_the_arranged_step_has_room_for():
    _, gp = _profiled("gpt2")
    prob = build_problem(gp)
    everything = prob.evaluate(_recompute_sets("gpt2")["sqrt"])  # sqrt(L)'s lowest-memory plan, arranged
    baseline = prob.evaluate(frozenset())
    assert everything.recomputed and everything.sim.peak_bytes < baseline.sim.peak_bytes
    # room for the whole no-checkpoint step: nothing stays recomputed
    assert trim(prob, everything, baseline.sim.peak_bytes).recompute == frozenset()
    # half-way: a fitting subset, no costlier
    budget = (everything.sim.peak_bytes + baseline.sim.peak_bytes) // 2
    kept = trim(prob, everything, budget)
    assert kept.recompute < everything.recompute and kept.sim.peak_bytes <= budget
    assert kept.cost_s < everything.cost_s
    assert kept.sim.peak_bytes == prob.evaluate(kept.recompute).sim.peak_bytes
    # each trim arranges its two reference steps and at most MAX_ARRANGED candidates
    arranged = [k for k in prob.evaluations if k[0] == "arranged"]
    assert len(arranged) <= 2 + 2 * MAX_ARRANGED, len(arranged)



def test_views_of_what_backward_holds_are_kept_not_rebuilt():
    """The ILP writes a view of a kept value (or of a weight) as rebuilt in backward: it
    has no variable for values that own no bytes. ``keep_aliases`` keeps those views at
    no cost in bytes or time, and the plan it gives runs exact, as simulated."""
    model, inputs = _case("gpt2")
    _, gp = _profiled("gpt2")
    prob = build_problem(gp)
    ev = prob.evaluate(_recompute_sets("gpt2")["sqrt"])
    static = set(gp.static_storages)
    held = static.union(*(gp.nodes[x].storages for x in ev.saved))
    multi = set(prob.parent.values())

    def free(e):
        return {n for n in e.recompute if prob.own_bytes[n] == 0 and n not in prob.parent and n not in multi
                and set(gp.nodes[n].storages) <= held}

    assert free(ev), "the case should rebuild views of kept values"
    kept = keep_aliases(prob, ev, ev.sim.peak_bytes)
    assert kept.recompute == ev.recompute - free(ev)
    assert kept.sim.peak_bytes <= ev.sim.peak_bytes and kept.cost_s <= ev.cost_s and len(kept.recomputed) < len(ev.recomputed)
    assert keep_aliases(prob, ev, kept.sim.peak_bytes - 1) is ev  # nothing over the budget
    p = plan_profile(gp, ev.sim.peak_bytes, solver="ilp")
    assert p.recomputed and "views kept" in p.solver.status
    views = {n for n in p.recomputed if prob.own_bytes[n] == 0 and n not in prob.parent and n not in multi}
    assert not {n for n in views if set(gp.nodes[n].storages) <= static.union(
        *(gp.nodes[d.name].storages for d in p.nodes if d.decision == "save"))}
    wrapped, planned_model = assert_same_step(model, lambda m: runtime.apply(m, p), inputs)
    assert measured_step_peak(wrapped, planned_model, inputs) <= p.predicted_peak_bytes + 64

def _example_args(op):
    """Arguments of the right kinds for one functional op of ``planner.reuse``'s table."""
    g, y = torch.randn(64, 256), torch.rand(64, 256) + 0.5
    mask = torch.rand(64, 256) > 0.5
    name = str(op)
    special = {
        "aten._log_softmax_backward_data.default": (g, torch.log_softmax(y, 1), 1, torch.float32),
        "aten._softmax_backward_data.default": (g, torch.softmax(y, 1), 1, torch.float32),
        "aten.threshold_backward.default": (g, y, 0.0),
        "aten.softplus_backward.default": (g, y, 1.0, 20.0),
        "aten.softplus.default": (y, 1.0, 20.0),
        "aten.pow.Tensor_Scalar": (y, 2),
        "aten.where.self": (mask, y, g),
        "aten.bitwise_and.Tensor": (mask, torch.rand(64, 256) > 0.5),
    }
    if name in special:
        return special[name]
    if name.endswith("_backward.default") or name.split(".")[1] in ("add", "sub", "mul", "div"):
        return (g, y)
    return (y,)


def test_every_reused_op_writes_into_its_input_and_allocates_nothing():
    for functional, (out_op, out_name) in OUT_VARIANTS.items():
        args = _example_args(functional)
        _, expected = measure_peak(lambda: functional(*args))
        for i, a in enumerate(args):
            if not (isinstance(a, torch.Tensor) and a.shape == expected.shape and a.dtype == expected.dtype):
                continue
            target = a.clone()
            call = [target if j == i else b for j, b in enumerate(args)]
            peak, got = measure_peak(lambda: out_op(*call, **{out_name: target}))
            assert peak == 0, f"{functional} writing into argument {i} allocated {peak} bytes"
            assert got.data_ptr() == target.data_ptr() and torch.equal(got, expected), f"{functional} into argument {i}"
