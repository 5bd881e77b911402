"""Planned + Inductor against eager, plain torch.compile and torch's own budget partitioner.

For each model (a 4-layer GPT-2 and a small ResNet), in one run, on one model
instance (every configuration wraps the same parameters):

1. eager;
2. ``torch.compile(model)`` (Inductor, its default partition), and for a model
   with convolutions on the CPU also with ``profiles.inductor_conv.CONV_CPU_OPTIONS``
   (the options planned + Inductor compiles such a model with: what they cost);
3. the planner's op-by-op runtime (``runtime.apply(model, plan)``) and
4. planned + Inductor (``planner.plan(..., executor="inductor")``, ``runtime.apply``)
   at a budget above eager's peak, and at 50% and 30% of eager's activation memory
   (``static + f * (eager peak - static)``, static = parameters, buffers, inputs);
5. ``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` at
   several fractions (Inductor, min-cut partition under a memory budget).

Each configuration runs a warm-up step (compiling), one step under the profiler
for its peak (``profiles.measure_peak``: allocator events; ``torch.cuda.max_memory_allocated``
on CUDA) plus the static bytes, then 20 steps interleaved with the others (step i
of every configuration before step i+1 of any); the median is reported. Loss and
gradients of planned + Inductor are compared with ``torch.compile``'s (same seed).

    python bench/bench_inductor.py [--model gpt2|resnet|all] [--steps 20] [--device cpu|cuda] [--out FILE]
        [--fractions 0.5,0.3] [--amb 0.5,0.3] [--threads 1] [--executors eager,inductor] [--lean]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from profiles import measure_peak, storage_bytes  # noqa: E402
from profiles.inductor_conv import CONV_CPU_OPTIONS  # noqa: E402
from profiles._torch_private import allow_recompiles, memory_budget_backend, no_aot_autograd_cache  # noqa: E402

MiB, GiB = 2**20, 2**30
FRACTIONS = (0.5, 0.3)
AMB_FRACTIONS = (0.7, 0.5, 0.3, 0.15, 0.05, 0.0)
SEED = 0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- models -------------------------------------------------------------------
def make_gpt2(device, scale: int = 1):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4 * scale, n_embd=128 * scale, n_head=4 * scale, vocab_size=256 * scale,
                                  n_positions=128 * scale)
    model = transformers.GPT2LMHeadModel(cfg).to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (8, 128 * scale), device=device)
    title = f"GPT-2 ({cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size}), input_ids {tuple(ids.shape)}, dropout 0.1"
    return title, model, {"input_ids": ids, "labels": ids, "use_cache": False}, (lambda out: out.loss)


class _ResNetLoss(torch.nn.Module):
    def __init__(self, widths):
        super().__init__()
        from bench_checkpointing import ResNet

        self.net = ResNet(widths=widths)

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


def make_resnet(device, scale: int = 1):
    torch.manual_seed(0)
    widths = tuple(w * scale for w in (16, 32, 64, 128))
    model = _ResNetLoss(widths).to(device).train()
    x = torch.randn(16 * scale, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (16 * scale,), device=device)
    title = f"ResNet-18-like (BasicBlocks 2-2-2-2, channels {'-'.join(map(str, widths))}, BatchNorm), input {tuple(x.shape)}"
    return title, model, (x, y), (lambda out: out)


MODELS = {"gpt2": make_gpt2, "resnet": make_resnet}


# -- one workload -------------------------------------------------------------
class Workload:
    def __init__(self, title, model, inputs, loss_of, device):
        self.title, self.model, self.inputs, self.loss_of, self.device = title, model, inputs, loss_of, device
        tensors = [v for v in (inputs.values() if isinstance(inputs, dict) else inputs) if isinstance(v, torch.Tensor)]
        self.static = storage_bytes(list(model.parameters()) + list(model.buffers()) + tensors)

    def zero(self):
        for p in self.model.parameters():
            p.grad = None

    def step(self, mod):
        torch.manual_seed(SEED)
        out = mod(**self.inputs) if isinstance(self.inputs, dict) else mod(*self.inputs)
        loss = self.loss_of(out)
        loss.backward()
        return loss.detach()

    def grads(self):
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def peak(self, mod) -> int:
        self.zero()
        gc.collect()
        delta, _ = measure_peak(lambda: self.step(mod), device=self.device)
        self.zero()
        return delta + self.static

    def timed(self, mod) -> float:
        self.zero()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step(mod)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        self.step(mod)
        return time.perf_counter() - t0


def _amb_module(wl: Workload, fraction: float):
    """torch.compile with Inductor and torch's budget partitioner at ``fraction``. Its
    own backend function (not ``"inductor"``, whose wrappers compare equal, so dynamo
    would reuse another configuration's compiled code), the setting active while it
    compiles."""
    compiled = torch.compile(wl.model, backend=memory_budget_backend(fraction))

    def warm():
        with no_aot_autograd_cache():
            wl.step(compiled)

    return compiled, warm


def _configs(wl: Workload, eager_peak: int, executors=("eager", "inductor"), amb=AMB_FRACTIONS,
             fractions=FRACTIONS, lean: bool = False) -> list[dict]:
    """Every configuration: label, kind, module, and for planned ones the plan. ``lean``:
    only ``torch.compile``, the planned fractions and ``activation_memory_budget`` (fewer
    configurations interleaved, so less noise between them)."""
    act = eager_peak - wl.static
    budgets = ([] if lean else [("above eager's peak", 2 * eager_peak)]) + [
        (f"{int(f * 100)}% of activations", int(wl.static + f * act)) for f in fractions]
    out = ([] if lean else [{"label": "eager", "kind": "eager", "module": wl.model}]) + [
        {"label": "torch.compile", "kind": "compile", "module": torch.compile(wl.model)}]
    if not lean and wl.device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in wl.model.modules()):
        opts = ", ".join(f"{k}={v}" for k, v in CONV_CPU_OPTIONS.items())
        out.append({"label": f"torch.compile, {opts}", "kind": "compile-conv-options",
                    "module": torch.compile(wl.model, options=dict(CONV_CPU_OPTIONS))})
    for executor in executors:
        for what, budget in budgets:
            label = f"planned {'op by op' if executor == 'eager' else '+ Inductor'}, {what}"
            row = {"label": label, "kind": f"planned-{executor}", "budget_bytes": budget}
            t0 = time.perf_counter()
            try:
                p = planner.plan(wl.model, budget / GiB, wl.inputs, executor=executor)
            except planner.BudgetTooSmall as e:
                row["error"] = f"BudgetTooSmall: minimum {e.min_budget_bytes / MiB:.2f} MiB"
                out.append(row)
                continue
            row.update(plan_s=time.perf_counter() - t0, plan=p, predicted_peak=p.predicted_peak_bytes,
                       recompute_flops_pct=100 * p.overhead, recomputed=len(p.recomputed),
                       module=runtime.apply(wl.model, p))
            out.append(row)
    for f in amb:
        mod, warm = _amb_module(wl, f)
        out.append({"label": f"torch.compile, activation_memory_budget={f}", "kind": "amb", "module": mod, "warm": warm})
    return out


def run_workload(name: str, device: torch.device, steps: int, scale: int, **which) -> dict:
    title, model, inputs, loss_of = MODELS[name](device, scale)
    wl = Workload(title, model, inputs, loss_of, device)
    log(f"{name}: {title}")
    wl.zero()
    wl.step(model)
    eager_peak = wl.peak(model)
    configs = _configs(wl, eager_peak, **which)
    ref_loss = ref_grads = None
    for c in configs:
        if "module" not in c:
            continue
        t0 = time.perf_counter()
        try:
            wl.zero()
            c.pop("warm", lambda: wl.step(c["module"]))()
            c["compile_s"] = time.perf_counter() - t0
            c["measured_peak"] = wl.peak(c["module"])
            wl.zero()
            loss = wl.step(c["module"])
            if c["kind"] == "compile":
                ref_loss, ref_grads = loss, wl.grads()
            elif c["kind"] == "planned-inductor" and ref_grads is not None:
                grads = wl.grads()
                c["loss_diff_vs_compile"] = (loss - ref_loss).abs().item()
                c["max_grad_diff_vs_compile"] = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
            log(f"  {c['label']}: ready in {c['compile_s']:.1f} s, peak {c['measured_peak'] / MiB:.2f} MiB")
        except Exception as e:  # noqa: BLE001  a failing configuration is reported, the others still run
            c["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            c.pop("module")
            log(traceback.format_exc())
    live = [c for c in configs if "module" in c]
    times: dict[str, list[float]] = {c["label"]: [] for c in live}
    for _ in range(steps):
        for c in live:
            times[c["label"]].append(wl.timed(c["module"]))
    wl.zero()
    rows = []
    for c in configs:
        row = {k: v for k, v in c.items() if k not in ("module", "plan", "warm")}
        if c["label"] in times:
            row["median_step_s"] = statistics.median(times[c["label"]])
        rows.append(row)
    return {"model": name, "title": title, "static_bytes": wl.static, "eager_peak_bytes": eager_peak, "rows": rows}


def table(result: dict) -> str:
    rows = {r["label"]: r for r in result["rows"]}
    base = rows.get("torch.compile", {}).get("median_step_s")
    lines = [f"### {result['title']}", "",
             f"static {result['static_bytes'] / MiB:.2f} MiB, eager peak {result['eager_peak_bytes'] / MiB:.2f} MiB", "",
             "| configuration | budget MiB | predicted MiB | measured MiB | median step ms | vs torch.compile | recomputed FLOPs |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r.get('budget_bytes', 0) / MiB:.2f} | | | {r['error']} | | |")
            continue
        med = r["median_step_s"]
        fmt = lambda k: f"{r[k] / MiB:.2f}" if r.get(k) is not None else ""  # noqa: E731
        rel = f"{100 * (med / base - 1):+.0f}%" if base else ""
        rec = f"{r['recompute_flops_pct']:.1f}%" if "recompute_flops_pct" in r else ""
        lines.append(f"| {r['label']} | {fmt('budget_bytes')} | {fmt('predicted_peak')} | {fmt('measured_peak')} | "
                     f"{1e3 * med:.1f} | {rel} | {rec} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", choices=[*MODELS, "all"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=int, default=1, help="multiply widths and batch (the GPU script uses more)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--amb", default=",".join(map(str, AMB_FRACTIONS)), help="activation_memory_budget fractions")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                    help="planned budgets: fractions of eager's activations (besides one above eager's peak)")
    ap.add_argument("--executors", default="eager,inductor", help="planned configurations: eager (op by op), inductor")
    ap.add_argument("--lean", action="store_true",
                    help="only torch.compile, the planned fractions and activation_memory_budget (less noise)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    allow_recompiles()
    names = list(MODELS) if args.model == "all" else [args.model]
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "load_before": os.getloadavg(), "device": str(device)}, "workloads": []}
    for name in names:
        which = {"executors": tuple(e for e in args.executors.split(",") if e),
                 "amb": tuple(float(f) for f in args.amb.split(",") if f),
                 "fractions": tuple(float(f) for f in args.fractions.split(",") if f), "lean": args.lean}
        results["workloads"].append(run_workload(name, device, args.steps, args.scale, **which))
        print(table(results["workloads"][-1]) + "\n", flush=True)
    results["machine"]["load_after"] = os.getloadavg()
    print(f"load average before {results['machine']['load_before']}, after {results['machine']['load_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
