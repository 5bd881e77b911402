"""The everyday training loop on the benchmark GPT-2: eager against the plan, measured.

``out = wrapped(**batch); loss = loss_fn(out); loss.backward(); opt.step(); opt.zero_grad()``
on the GPT-2 of ``bench/bench_checkpointing.py`` (6 layers, n_embd 256, vocab 1000,
batch 8x256, dropout on), the loss (cross-entropy on fp32 logits) computed outside the
model. Scenarios, each planned at half of the step's memory above what lives all step
(parameters, buffers, inputs, held gradients, optimizer state), measured eagerly:

1. ``loss outside``: ``plan(..., loss_fn=)``; beside it the plan made without
   ``loss_fn`` at the same budget, run in the same loop;
2. ``accumulation``: 4 micro-steps, ``grad_accumulation=True``; the largest micro-step;
3. ``AdamW``: ``AdamW(foreach=True)`` (torch's default on CUDA), the whole iteration,
   ``optimizer=OptimizerSpec(name="adamw", implementation="foreach")``; the second
   iteration (state resident);
4. ``autocast``: planned and run under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
   the peak only.

Peaks: ``profiles.measure_peak`` (allocator events) plus what was live before the
measured call. FLOPs: the plan's ``(total + recomputed) / total``; eager 1.000.

    python bench/bench_training_loop.py [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from bench_checkpointing import machine, make_gpt2  # noqa: E402
from planner.optimizer_memory import optimizer_memory  # noqa: E402
from profiles import measure_peak, storage_bytes  # noqa: E402

MiB = 2**20
FRACTION = 0.5
MICRO_STEPS = 4


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _setup():
    wl = make_gpt2()
    ids = wl.inputs["input_ids"]
    inputs = {"input_ids": ids, "use_cache": False}
    labels = ids.flatten()
    return wl.model, inputs, lambda out: F.cross_entropy(out.logits.float().flatten(0, 1), labels)


def _iteration(module, inputs, loss_fn, opt=None, seed=0):
    torch.manual_seed(seed)
    out = module(**inputs)
    loss = loss_fn(out)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


def _measured(module, owner, inputs, loss_fn, *, micro=1, opt=None, held=0, ctx=contextlib.nullcontext):
    """Peak of the last of ``micro`` iterations (after a warm-up one that compiles),
    plus the static bytes and ``held`` (bytes resident before it: gradients, state)."""
    with ctx():
        _iteration(module, inputs, loss_fn, opt)
        owner.zero_grad(set_to_none=True)
        for i in range(micro - 1):
            _iteration(module, inputs, loss_fn, opt, seed=i)
        peak, loss = measure_peak(lambda: _iteration(module, inputs, loss_fn, opt, seed=micro - 1))
    static = storage_bytes([*owner.parameters(), *owner.buffers(), *[v for v in inputs.values() if torch.is_tensor(v)]])
    return static + held + peak, loss


def _plan(model, inputs, low, high, ctx=contextlib.nullcontext, **kw):
    """The plan at FRACTION of the way from ``low`` (what lives all step) to ``high`` (eager's measured peak)."""
    with ctx():
        return planner.plan(model, (low + FRACTION * (high - low)) / planner.GiB, inputs, **kw)


def _row(name, eager_peak, p, measured, note=""):
    over = "" if measured <= p.budget_bytes else " **over**"
    eager = f"{eager_peak / MiB:.2f}" if eager_peak is not None else "(above)"
    return (f"| {name} | {eager} | {p.budget_bytes / MiB:.2f} | {p.predicted_peak_bytes / MiB:.2f} | "
            f"{measured / MiB:.2f}{over} | {1 + p.overhead:.3f} | {note} |")


def scenario(name, model, inputs, loss_of, *, ctx=contextlib.nullcontext, **kw):
    """One row: eager's measured peak, the plan at FRACTION, its measured peak."""
    log(name)
    static = storage_bytes([*model.parameters(), *model.buffers(), inputs["input_ids"]])
    grads = sum(q.numel() * q.element_size() for q in model.parameters())
    accum = kw.get("grad_accumulation", False)
    micro = MICRO_STEPS if accum else 1
    spec = kw.get("optimizer")
    held = (grads if accum else 0) + _state(model, spec)
    eager = copy.deepcopy(model)
    opt_e = torch.optim.AdamW(eager.parameters(), foreach=True) if spec else None
    eager_peak, loss_e = _measured(eager, eager, inputs, loss_of, micro=micro, opt=opt_e, held=held, ctx=ctx)
    p = _plan(model, inputs, static + held, eager_peak, ctx=ctx, **kw)
    planned = copy.deepcopy(model)
    opt_p = torch.optim.AdamW(planned.parameters(), foreach=True) if spec else None
    measured, loss_p = _measured(runtime.apply(planned, p), planned, inputs, loss_of, micro=micro, opt=opt_p,
                                 held=held, ctx=ctx)
    note = f"loss {loss_p:.6g} (eager {loss_e:.6g})"
    if spec:
        tl = p.training_loop
        note += f"; predicted opt.step() {tl.optimizer_step_peak_bytes / MiB:.2f}, backward {tl.backward_peak_bytes / MiB:.2f}"
    return [_row(name, eager_peak, p, measured, note)], p


def _state(model, spec) -> int:
    """The optimizer's state bytes (0 without one)."""
    if spec is None:
        return 0
    return optimizer_memory(list(model.parameters()), spec).state_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the table here too, a row at a time")
    a = ap.parse_args(argv)
    model, inputs, loss_fn = _setup()
    out = open(a.out, "w") if a.out else None

    def emit(*lines):
        for line in lines:
            print(line, flush=True)
            if out is not None:
                out.write(line + "\n")
                out.flush()

    emit(f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start", "",
         "| scenario | eager peak (MiB) | budget (MiB) | predicted (MiB) | measured (MiB) | FLOPs | notes |",
         "|---|---|---|---|---|---|---|")
    rows, p = scenario("loss outside (`loss_fn=`)", model, inputs, loss_fn, loss_fn=loss_fn)
    emit(*rows)
    emit(*scenario("accumulation, 4 micro-steps (`grad_accumulation=True`)", model, inputs, loss_fn,
                   loss_fn=loss_fn, grad_accumulation=True)[0])
    spec = planner.OptimizerSpec(name="adamw", implementation="foreach")
    emit(*scenario("AdamW(foreach=True), whole iteration (`optimizer=`)", model, inputs, loss_fn,
                   loss_fn=loss_fn, optimizer=spec)[0])
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    emit(*scenario("autocast bf16 (peak only)", model, inputs, loss_fn, ctx=bf16, loss_fn=loss_fn)[0])
    # the first budget, planned without loss_fn: what the same loop measures then
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", planner.LossNotCountedWarning)
        blind = planner.plan(model, p.budget_bytes / planner.GiB, inputs)
    planned = copy.deepcopy(model)
    measured, _ = _measured(runtime.apply(planned, blind), planned, inputs, loss_fn)
    emit(_row("loss outside, planned without `loss_fn`", None, blind, measured, "the loss's memory not counted"),
         "", f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
