"""Benchmark the checkpoint planner against the usual alternatives, on this machine's CPU.

For each model (a small GPT-2 and a small ResNet), in one run, measure one training
step (forward + loss + backward, every parameter's ``.grad`` set to ``None`` first)
under each configuration:

1. eager: the plain model;
2. every-block checkpointing: Hugging Face ``gradient_checkpointing_enable()`` for
   GPT-2, ``torch.utils.checkpoint`` (``use_reentrant=False``) around each residual
   stage for the ResNet;
3. ``torch.compile(model, backend="aot_eager")`` with
   ``torch._functorch.config.activation_memory_budget`` at 0.7, 0.5, 0.3, 0.1;
4. the planner's sqrt(L) solver at half of eager's peak (or the lowest fraction that
   gives a sqrt plan);
5. the planner's ILP at the measured peak of every configuration in 2 and 3, and at
   its minimum feasible budget.

Peaks are absolute: ``profiles.measure_peak``'s delta (allocator events) plus the
storage of parameters, buffers and inputs. FLOPs: ``FlopCounterMode`` for eager and
the peers (relative to eager's count); ``plan.total_flops + plan.recompute_flops``
relative to ``plan.total_flops`` for planner rows, with ``FlopCounterMode`` run on
the planned module too as a cross-check.

    python bench/bench_checkpointing.py [--model gpt2|resnet|all] [--objective time|flops] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from profiles import measure_peak, storage_bytes  # noqa: E402

MiB = 2**20
GiB = 2**30
COMPILE_BUDGETS = (0.7, 0.5, 0.3, 0.1)
RTOL, ATOL = 1e-5, 1e-6
SEED = 0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 layout (2 BasicBlocks per stage), channels 32-64-128-256, 3x3 stem."""

    def __init__(self, widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)
        self.checkpoint_stages = False  # the "every block" peer: checkpoint each residual stage

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            if self.checkpoint_stages and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class ResNetWithLoss(nn.Module):
    """Puts the cross-entropy loss inside forward so it is part of the captured step."""

    def __init__(self):
        super().__init__()
        self.net = ResNet()

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


@dataclass
class Workload:
    name: str
    title: str
    model: nn.Module
    inputs: Any  # dict of kwargs or tuple of args, as passed to plan()
    loss_of: Callable[[Any], torch.Tensor]
    peer_name: str
    enable_peer: Callable[[], None]
    disable_peer: Callable[[], None]

    def call(self, mod: nn.Module):
        if isinstance(self.inputs, dict):
            return mod(**self.inputs)
        return mod(*self.inputs)

    def input_tensors(self) -> list:
        vals = self.inputs.values() if isinstance(self.inputs, dict) else self.inputs
        return [v for v in vals if isinstance(v, torch.Tensor)]


def make_gpt2() -> Workload:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=6, n_embd=256, n_head=8, vocab_size=1000, n_positions=256)
    model = GPT2LMHeadModel(cfg)
    model.train()
    ids = torch.randint(0, 1000, (8, 256))

    def enable():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated alias of activation_checkpointing_enable in transformers 5
            model.gradient_checkpointing_enable()

    def disable():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_disable()

    return Workload(
        name="gpt2",
        title="GPT-2 (6 layers, n_embd 256, 8 heads, vocab 1000, 256 positions), input_ids (8, 256), labels = input_ids, use_cache=False",
        model=model,
        # use_cache=False, as Hugging Face's own gradient checkpointing forces in
        # training: with the cache on, the 12 key/value outputs are held by the
        # caller and AOTAutograd gives them zero gradients that eager never allocates.
        inputs={"input_ids": ids, "labels": ids, "use_cache": False},
        loss_of=lambda out: out.loss,
        peer_name="HF gradient_checkpointing_enable() (every block)",
        enable_peer=enable,
        disable_peer=disable,
    )


def make_resnet() -> Workload:
    torch.manual_seed(0)
    model = ResNetWithLoss()
    model.train()
    x = torch.randn(16, 3, 64, 64)
    y = torch.randint(0, 10, (16,))

    def enable():
        model.net.checkpoint_stages = True

    def disable():
        model.net.checkpoint_stages = False

    return Workload(
        name="resnet",
        title="ResNet-18-like (BasicBlocks 2-2-2-2, channels 32-64-128-256, BatchNorm, 3x3 stem), input (16, 3, 64, 64), 10 classes, cross-entropy inside forward",
        model=model,
        inputs=(x, y),
        loss_of=lambda out: out,
        peer_name="torch.utils.checkpoint per residual stage (use_reentrant=False)",
        enable_peer=enable,
        disable_peer=disable,
    )


WORKLOADS = {"gpt2": make_gpt2, "resnet": make_resnet}


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


@dataclass
class Row:
    config: str
    kind: str  # "eager", "peer", "sqrt", "ilp"
    budget_bytes: int | None = None
    measured_peak: int | None = None
    predicted_peak: int | None = None
    flops_ratio: float | None = None  # primary method
    flops_method: str = ""
    flops_cross: float | None = None  # FlopCounterMode / eager FlopCounterMode
    grads_equal: bool | None = None
    max_grad_err: float | None = None
    plan_s: float | None = None
    notes: list = field(default_factory=list)
    error: str | None = None
    plan_obj: Any = None
    peer_of: str | None = None  # for ilp rows: the peer whose peak is the budget


class Bench:
    def __init__(self, wl: Workload):
        self.wl = wl
        self.params = list(wl.model.parameters())
        self.static = storage_bytes(self.params + list(wl.model.buffers()) + wl.input_tensors())
        self.ref_grads: dict | None = None
        self.eager_flops: int | None = None
        self.eager_fwd_flops: int | None = None
        self.ref_loss: torch.Tensor | None = None
        self.last_loss: torch.Tensor | None = None
        self.eager_peak: int | None = None

    def zero(self):
        for p in self.params:
            p.grad = None

    def step_fn(self, mod):
        def f():
            torch.manual_seed(SEED)
            out = self.wl.call(mod)
            loss = self.wl.loss_of(out)
            loss.backward()
            return loss.detach()

        return f

    def run_step(self, mod):
        self.zero()
        return self.step_fn(mod)()

    def measure(self, mod) -> tuple[int, dict]:
        """Absolute peak of one step, and the gradients it produced."""
        self.zero()
        gc.collect()
        delta, loss = measure_peak(self.step_fn(mod))
        self.last_loss = loss
        grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in self.wl.model.named_parameters()}
        self.zero()
        return delta + self.static, grads

    def count_flops(self, mod) -> int:
        """FlopCounterMode over the whole step (only for modules that are not torch.compile'd:
        dynamo does not trace frames while a dispatch mode is active, so a compiled module
        would silently run eager under the counter)."""
        self.zero()
        with FlopCounterMode(display=False) as fc:
            self.step_fn(mod)()
        self.zero()
        return fc.get_total_flops()

    def count_fwd_flops(self, mod) -> int:
        """FlopCounterMode over forward + loss only (eager module)."""
        self.zero()
        torch.manual_seed(SEED)
        with FlopCounterMode(display=False) as fc:
            loss = self.wl.loss_of(self.wl.call(mod))
        del loss
        self.zero()
        return fc.get_total_flops()

    def count_bwd_flops(self, mod) -> int:
        """FlopCounterMode over backward only: the forward runs compiled, outside the counter;
        the compiled backward graph (recomputation included) runs op by op under it."""
        self.zero()
        torch.manual_seed(SEED)
        loss = self.wl.loss_of(self.wl.call(mod))
        with FlopCounterMode(display=False) as fc:
            loss.backward()
        del loss
        self.zero()
        return fc.get_total_flops()

    def count_compiled_flops(self, mod) -> int:
        """Eager forward FLOPs + the compiled module's backward FLOPs (both FlopCounterMode)."""
        return self.eager_fwd_flops + self.count_bwd_flops(mod)

    def loss_note(self) -> str:
        same = self.last_loss is not None and torch.equal(self.last_loss, self.ref_loss)
        return f"loss {'identical to' if same else 'DIFFERS from'} eager's"

    def compare(self, grads: dict) -> tuple[bool, float]:
        ok, err = True, 0.0
        for n, g in grads.items():
            r = self.ref_grads[n]
            if g is None or r is None:
                ok = ok and (g is None and r is None)
                continue
            err = max(err, (g - r).abs().max().item())
            ok = ok and torch.allclose(g, r, rtol=RTOL, atol=ATOL)
        return ok, err


def _short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:140] + ("..." if len(text) > 140 else "")


def _reset():
    torch._dynamo.reset()
    gc.collect()


def run_eager(b: Bench) -> Row:
    row = Row("eager", "eager", flops_method="FlopCounterMode (= reference)")
    m = b.wl.model
    b.run_step(m)  # warm-up
    row.measured_peak, b.ref_grads = b.measure(m)
    b.ref_loss = b.last_loss
    b.eager_peak = row.measured_peak
    b.eager_flops = b.count_flops(m)
    b.eager_fwd_flops = b.count_fwd_flops(m)
    row.flops_ratio = row.flops_cross = 1.0
    row.grads_equal, row.max_grad_err = True, 0.0
    row.notes.append(f"FlopCounterMode: {b.eager_flops / 1e9:.2f} GFLOP per step, of which forward + loss {b.eager_fwd_flops / 1e9:.2f}")
    return row


def _finish_peer(b: Bench, row: Row, mod, compiled: bool) -> None:
    row.measured_peak, grads = b.measure(mod)
    row.grads_equal, row.max_grad_err = b.compare(grads)
    if not row.grads_equal:
        row.notes.append(b.loss_note())
    fl = b.count_compiled_flops(mod) if compiled else b.count_flops(mod)
    row.flops_ratio = row.flops_cross = fl / b.eager_flops


def run_every_block(b: Bench) -> Row:
    row = Row(b.wl.peer_name, "peer", flops_method="FlopCounterMode (whole step) / eager")
    try:
        b.wl.enable_peer()
        b.run_step(b.wl.model)  # warm-up
        _finish_peer(b, row, b.wl.model, compiled=False)
    except Exception as e:  # noqa: BLE001
        row.error = _short_error(e)
        log(traceback.format_exc())
    finally:
        b.wl.disable_peer()
        b.zero()
    return row


def run_compile(b: Bench, budget: float) -> Row:
    row = Row(
        f'torch.compile(aot_eager), activation_memory_budget={budget}',
        "peer",
        flops_method="FlopCounterMode (eager fwd + compiled bwd) / eager",
    )
    _reset()
    try:
        with torch._functorch.config.patch(activation_memory_budget=budget):
            cm = torch.compile(b.wl.model, backend="aot_eager")
            b.run_step(cm)  # compile + warm-up, under the budget setting
        # Any recompilation while measuring would silently use another budget: make it an error.
        with torch._dynamo.config.patch(error_on_recompile=True):
            _finish_peer(b, row, cm, compiled=True)
        del cm
        if not row.grads_equal:
            ops = _random_ops_in_backward(b, budget)
            if ops:
                row.notes.append(
                    "its backward graph re-runs random ops (" + ", ".join(f"{k} x{v}" for k, v in ops.items())
                    + "): dropout masks are drawn afresh in backward, not replayed"
                )
            else:
                row.notes.append("no random ops found in its backward graph")
    except Exception as e:  # noqa: BLE001
        row.error = _short_error(e)
        log(traceback.format_exc())
    finally:
        b.zero()
        _reset()
    return row


def _random_ops_in_backward(b: Bench, budget: float) -> dict:
    """Compile again with aot_eager's own function, recording the partitioned graphs, and
    count random (``nondeterministic_seeded``) ops in the backward graphs: a random op
    recomputed in backward draws new random numbers, so its gradients differ from eager's."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._functorch.aot_autograd import make_boxed_func

    bw_graphs = []

    def fw(gm, ex):
        return make_boxed_func(gm.forward)

    def bw(gm, ex):
        bw_graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, ex):
        return aot_eager(gm, ex, fw_compiler=fw, bw_compiler=bw)

    _reset()
    counts: dict = {}
    try:
        with torch._functorch.config.patch(activation_memory_budget=budget):
            b.run_step(torch.compile(b.wl.model, backend=backend))
        for gm in bw_graphs:
            for n in gm.graph.nodes:
                tags = getattr(n.target, "tags", ()) if n.op == "call_function" else ()
                if torch.Tag.nondeterministic_seeded in tags:
                    counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    finally:
        b.zero()
        _reset()
    return counts


#: What the planner minimises (``--objective``): "time" (its default) or "flops".
OBJECTIVE = "time"


def _plan(b: Bench, budget_bytes: int, solver: str):
    t0 = time.perf_counter()
    p = planner.plan(b.wl.model, budget_bytes / GiB, b.wl.inputs, solver=solver, objective=OBJECTIVE)
    return p, time.perf_counter() - t0


def _run_planned(b: Bench, row: Row, p) -> None:
    row.plan_obj = p
    row.predicted_peak = p.predicted_peak_bytes
    row.budget_bytes = p.budget_bytes
    row.flops_ratio = (p.total_flops + p.recompute_flops) / p.total_flops if p.total_flops else None
    row.notes.append(f"solver {p.solver.name} ({p.solver.status}, {p.solver.seconds:.1f} s, {p.solver.calls} calls), {len(p.recomputed)} values recomputed")
    _reset()
    w = runtime.apply(b.wl.model, p)
    b.run_step(w)  # compile + warm-up
    row.measured_peak, grads = b.measure(w)
    row.grads_equal, row.max_grad_err = b.compare(grads)
    if not row.grads_equal:
        row.notes.append(b.loss_note())
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            row.flops_cross = b.count_compiled_flops(w) / b.eager_flops
    except Exception as e:  # noqa: BLE001
        row.notes.append(f"FlopCounterMode cross-check failed: {_short_error(e)}")
    del w
    b.zero()
    _reset()


def run_sqrt(b: Bench) -> Row:
    row = Row("planner sqrt", "sqrt", flops_method="plan: (total + recompute) / total")
    tried = []
    try:
        for frac in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            budget = int(b.eager_peak * frac)
            try:
                p, secs = _plan(b, budget, "sqrt")
            except planner.BudgetTooSmall as e:
                tried.append(f"{frac:.1f}x: BudgetTooSmall (min {e.min_budget_bytes / MiB:.1f} MiB)")
                continue
            if p.solver.name != "sqrt":
                tried.append(f"{frac:.1f}x: sqrt found nothing, plan() returned a {p.solver.name} plan")
                continue
            row.config = f"planner sqrt @ {frac:.1f} x eager peak"
            row.plan_s = secs
            _run_planned(b, row, p)
            break
        else:
            row.error = "no sqrt plan at 0.5-1.0 x eager peak"
    except Exception as e:  # noqa: BLE001
        row.error = _short_error(e)
        log(traceback.format_exc())
    if tried:
        row.notes.append("tried first: " + "; ".join(tried))
    b.zero()
    return row


def run_ilp(b: Bench, budget_bytes: int, label: str, peer_of: str | None) -> Row:
    row = Row(label, "ilp", budget_bytes=budget_bytes, flops_method="plan: (total + recompute) / total", peer_of=peer_of)
    t0 = time.perf_counter()
    try:
        p, secs = _plan(b, budget_bytes, "ilp")
        row.plan_s = secs
        _run_planned(b, row, p)
    except planner.BudgetTooSmall as e:
        row.plan_s = time.perf_counter() - t0
        row.error = f"BudgetTooSmall: minimum {e.min_budget_bytes / MiB:.1f} MiB"
    except Exception as e:  # noqa: BLE001
        row.error = _short_error(e)
        log(traceback.format_exc())
    b.zero()
    return row


def run_ilp_minimum(b: Bench) -> tuple[Row, Row]:
    """Probe the minimum feasible budget (BudgetTooSmall at ~0), then plan at it."""
    probe = Row("planner ilp: probe at 1 MiB", "probe", budget_bytes=MiB)
    min_bytes = None
    t0 = time.perf_counter()
    try:
        p = planner.plan(b.wl.model, 1 / 1024, b.wl.inputs, solver="ilp")
        probe.notes.append(f"unexpectedly fit: predicted {p.predicted_peak_bytes / MiB:.1f} MiB")
        min_bytes = p.predicted_peak_bytes
    except planner.BudgetTooSmall as e:
        min_bytes = e.min_budget_bytes
        probe.predicted_peak = min_bytes
        probe.notes.append(f"BudgetTooSmall.min_budget_bytes = {min_bytes} ({min_bytes / MiB:.1f} MiB)")
    except Exception as e:  # noqa: BLE001
        probe.error = _short_error(e)
        log(traceback.format_exc())
    probe.plan_s = time.perf_counter() - t0
    if min_bytes is None:
        return probe, Row("planner ilp @ minimum budget", "ilp-min", error="minimum unknown (probe failed)")
    row = run_ilp(b, min_bytes, "planner ilp @ minimum feasible budget", None)
    row.kind = "ilp-min"
    return probe, row


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def _mib(x):
    return "" if x is None else f"{x / MiB:.1f}"


def _ratio(x):
    return "" if x is None else f"{x:.3f}"


HEADER = (
    "| # | Configuration | Budget (MiB) | Measured peak (MiB) | Predicted peak (MiB) | Peak / eager "
    "| FLOPs / baseline | FLOPs method | FlopCounterMode / eager | Grads == eager (max abs err) | plan() s | Notes |"
)
SEP = "|" + "---|" * 12


def table(b: Bench, rows: list[Row]) -> str:
    out = [HEADER, SEP]
    for i, r in enumerate(rows, 1):
        if r.grads_equal is None:
            g = ""
        else:
            g = f"{'yes' if r.grads_equal else 'NO'} ({r.max_grad_err:.1e})"
        notes = list(r.notes)
        if r.error:
            notes.insert(0, f"**ERROR**: {r.error}")
        peak_rel = "" if r.measured_peak is None or not b.eager_peak else f"{r.measured_peak / b.eager_peak:.3f}"
        cells = [
            str(i),
            r.config,
            _mib(r.budget_bytes),
            _mib(r.measured_peak),
            _mib(r.predicted_peak),
            peak_rel,
            _ratio(r.flops_ratio) if r.kind != "probe" else "",
            r.flops_method,
            _ratio(r.flops_cross),
            g,
            "" if r.plan_s is None else f"{r.plan_s:.1f}",
            "; ".join(notes).replace("|", "/"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def goals(b: Bench, rows: list[Row], is_gpt2: bool) -> tuple[str, dict]:
    """Check the issue's goals against the measured rows."""
    lines, verdict = [], {}
    peers = [r for r in rows if r.kind == "peer"]
    ilps = [r for r in rows if r.kind == "ilp" and r.peer_of]
    all_ok = True
    for peer in peers:
        ilp = next((r for r in ilps if r.peer_of == peer.config), None)
        if peer.error or peer.measured_peak is None:
            lines.append(f"  - vs {peer.config}: peer failed ({peer.error}); no comparison.")
            all_ok = False
            continue
        if ilp is None or ilp.error or ilp.measured_peak is None:
            lines.append(f"  - vs {peer.config}: **NOT MET** — ilp at {peer.measured_peak / MiB:.1f} MiB failed ({ilp.error if ilp else 'missing'}).")
            all_ok = False
            continue
        mem_ok = ilp.measured_peak <= peer.measured_peak
        fl_ok = ilp.flops_ratio is not None and peer.flops_ratio is not None and ilp.flops_ratio < peer.flops_ratio
        cross = ""
        if ilp.flops_cross is not None:
            cross_ok = ilp.flops_cross < peer.flops_ratio
            cross = f"; by FlopCounterMode on both {ilp.flops_cross:.4f} vs {peer.flops_ratio:.4f} ({'lower' if cross_ok else 'NOT lower'})"
        ok = mem_ok and fl_ok
        all_ok = all_ok and ok
        lines.append(
            f"  - vs {peer.config}: ilp peak {ilp.measured_peak / MiB:.1f} MiB vs {peer.measured_peak / MiB:.1f} MiB "
            f"({'no higher' if mem_ok else '**HIGHER**'}); FLOPs {ilp.flops_ratio:.4f} vs {peer.flops_ratio:.4f} "
            f"({'lower' if fl_ok else '**NOT lower**'}){cross} → {'met' if ok else '**NOT MET**'}."
        )
    verdict["ilp beats every peer at its peak"] = all_ok
    lines.insert(0, f"- **Goal 1 — at every peer's peak, ilp is no higher in memory and lower in FLOPs: {'MET' if all_ok else 'NOT MET'}**")

    mins = [r for r in rows if r.kind == "ilp-min"]
    probe = next((r for r in rows if r.kind == "probe"), None)
    min_bytes = probe.predicted_peak if probe else None
    peer_peaks = [p.measured_peak for p in peers if p.measured_peak is not None]
    if min_bytes is None or not peer_peaks:
        verdict["minimum below all peers"] = False
        lines.append("- **Goal 2 — minimum feasible budget below every peer's peak: NOT MET** (minimum or peer peaks unknown)")
    else:
        ok = min_bytes < min(peer_peaks)
        meas = mins[0].measured_peak if mins and mins[0].measured_peak is not None else None
        meas_ok = meas is not None and meas < min(peer_peaks)
        verdict["minimum below all peers"] = ok
        lines.append(
            f"- **Goal 2 — minimum feasible budget below every peer's peak: {'MET' if ok else 'NOT MET'}** — "
            f"min_budget_bytes {min_bytes / MiB:.1f} MiB vs lowest peer peak {min(peer_peaks) / MiB:.1f} MiB"
            + (
                f"; measured peak of the plan at that budget {meas / MiB:.1f} MiB ({'below' if meas_ok else 'NOT below'} the lowest peer)"
                if meas is not None
                else " (predicted only: the plan at that budget could not run, see its row)"
            )
            + "."
        )
        pred = mins[0].predicted_peak if mins else None
        if pred is not None and pred < min_bytes:
            lines.append(
                f"  - Note: the plan made at that budget is predicted at {pred / MiB:.1f} MiB, "
                f"{(min_bytes - pred) / MiB:.1f} MiB below the reported minimum "
                f"({'below' if pred < min(peer_peaks) else 'still NOT below'} the lowest peer peak)."
        )
    if is_gpt2:
        times = [r.plan_s for r in rows if r.kind in ("ilp", "ilp-min", "probe") and r.plan_s is not None]
        ok = bool(times) and max(times) < 10.0
        verdict["plan() < 10 s"] = ok
        lines.append(
            f"- **Goal 3 — plan() wall time under 10 s for this GPT-2: {'MET' if ok else 'NOT MET'}** — the ilp plan() calls "
            "(rows in table order, the BudgetTooSmall probe included) took "
            + ", ".join(f"{t:.1f}" for t in times)
            + f" s (max {max(times) if times else float('nan'):.1f} s; capture and profiling included)."
        )
    return "\n".join(lines), verdict


def run_workload(name: str) -> tuple[str, dict, float]:
    t_start = time.perf_counter()
    load0 = _load()
    wl = WORKLOADS[name]()
    b = Bench(wl)
    log(f"{name}: static {b.static / MiB:.1f} MiB")
    rows: list[Row] = []

    def add(r: Row):
        rows.append(r)
        log(f"{name}: {r.config}: peak {_mib(r.measured_peak)} MiB, flops {_ratio(r.flops_ratio)}, grads {r.grads_equal}, err {r.error}")

    add(run_eager(b))
    add(run_every_block(b))
    for x in COMPILE_BUDGETS:
        add(run_compile(b, x))
    add(run_sqrt(b))
    for peer in [r for r in rows if r.kind == "peer"]:
        if peer.measured_peak is None:
            add(Row(f"planner ilp @ peak of [{peer.config}]", "ilp", peer_of=peer.config, error="peer failed; no budget"))
            continue
        add(run_ilp(b, peer.measured_peak, f"planner ilp @ peak of [{peer.config}]", peer.config))
    probe, mrow = run_ilp_minimum(b)
    add(probe)
    add(mrow)
    elapsed = time.perf_counter() - t_start
    text = [f"### {wl.title}", ""]
    text.append(
        f"Static bytes (parameters + buffers + inputs): {b.static / MiB:.1f} MiB. "
        f"Eager FlopCounterMode count: {b.eager_flops / 1e9:.2f} GFLOP per step"
        + (
            f"; planner's plan.total_flops: {next(r.plan_obj.total_flops for r in rows if r.plan_obj is not None) / 1e9:.2f} GFLOP."
            f" Planner's predicted no-recompute peak (plan.baseline_peak_bytes): "
            f"{next(r.plan_obj.baseline_peak_bytes for r in rows if r.plan_obj is not None) / MiB:.1f} MiB"
            f" (eager measured: {b.eager_peak / MiB:.1f} MiB)."
            if any(r.plan_obj is not None for r in rows)
            else "."
        )
        + f" Wall time for this model's benchmark: {elapsed:.0f} s"
        + f" (1-minute load average {load0:.1f} at start, {_load():.1f} at end, on {os.cpu_count()} cores)."
    )
    text += ["", table(b, rows), ""]
    g, verdict = goals(b, rows, name == "gpt2")
    text += [g, ""]
    return "\n".join(text), verdict, elapsed


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine() -> str:
    try:
        cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
        cpu = " ".join(cpu.split(":", 1)[-1].split())
    except Exception:  # noqa: BLE001
        cpu = platform.processor() or "unknown"
    return (
        f"CPU: {cpu}, {os.cpu_count()} cores (torch threads: {torch.get_num_threads()}); "
        f"torch {torch.__version__}; Python {platform.python_version()}; "
        f"date {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["gpt2", "resnet", "all"], default="all")
    ap.add_argument("--out", default=None, help="write the markdown fragment (machine line + tables + goals) here")
    ap.add_argument("--objective", choices=["time", "flops"], default="time",
                    help="what the planner minimises: estimated recompute time (its default) or recomputed FLOPs")
    args = ap.parse_args(argv)
    global OBJECTIVE
    OBJECTIVE = args.objective
    names = ["gpt2", "resnet"] if args.model == "all" else [args.model]
    parts = [f"Machine: {machine()}; planner objective: {OBJECTIVE}", ""]
    for n in names:
        text, verdict, _ = run_workload(n)
        print(text, flush=True)
        parts.append(text)
    fragment = "\n".join(parts)
    if args.out:
        with open(args.out, "w") as f:
            f.write(fragment + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
