"""Plan a Llama-7B-shaped model built on the meta device for an H100, on this machine.

Builds ``LlamaForCausalLM`` (hidden 4096, 32 layers, 32 heads, intermediate 11008,
vocab 32000; random-init config, nothing downloaded) in bf16 under
``torch.device("meta")`` with a 1x2048 batch of ids (also the labels), then times
each phase separately:

1. capture: ``profiles.capture`` (fake CPU tensors; nothing allocated);
2. profile: ``profiles.profile_graph(target="h100")`` (roofline times);
3. solve: ``planner.api.plan_profile`` at the budget, for each solver asked.

and reports the peak RSS of the process (``resource.getrusage``, kilobytes on
Linux), the joint graph's node count, the predicted no-checkpoint and planned
peaks, and a by-hand estimate to check them against: parameters + gradients +
the activations each decoder layer keeps for backward, counted tensor by tensor
from the layer's code (see ``by_hand``).

    python bench/bench_meta_llama.py [--layers 32] [--batch 1] [--solvers sqrt,auto] [--budget-gb 40]
                                     [--api auto] [--world-size 8 --sharding fsdp --optimizer adamw]
                                     [--out FILE]

``--api auto`` also times the public ``planner.plan(model, 40, inputs,
target="h100")`` end to end (it captures again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from planner.api import BudgetTooSmall, plan_profile  # noqa: E402
from planner.plan_type import GiB  # noqa: E402
from profiles import capture, profile_graph  # noqa: E402

MiB = 2**20


def rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def build(*, layers: int, hidden: int, heads: int, intermediate: int, vocab: int, batch: int, seq: int, kv_heads: int | None = None):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads or heads, intermediate_size=intermediate, vocab_size=vocab,
                                   max_position_embeddings=max(seq, 2048), use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).train()
        ids = torch.zeros(batch, seq, dtype=torch.long)
    return model, {"input_ids": ids, "labels": ids}


def by_hand(*, layers: int, hidden: int, heads: int, intermediate: int, vocab: int, batch: int, seq: int,
            kv_heads: int | None = None) -> dict:
    """Bytes of one training step of a bf16 Llama, counted from its code.

    Parameters P (2 bytes each) and their gradients (P again). Per decoder layer,
    the tensors the layer's backward reads, with T = batch*seq tokens, h = hidden,
    i = intermediate (bf16 = 2 bytes, fp32 = 4):

    - 2 RMSNorms (HF computes them in fp32): the fp32 input (4Th, read by pow and
      by the multiply with rsqrt), the normalised value cast back to bf16 (2Th, read
      by the weight's gradient) and the output after the weight, the next matmuls'
      input (2Th): 2 x 8Th;
    - attention: q and k after rotary (2Th and 2Tk; the projections' outputs before
      rotary are not needed), v (2Tk) and the attention output (2Th, whose
      transpose is already o_proj's contiguous input): 4Th + 4Tk, where k = h x
      kv_heads / heads is the width of the keys and values (k = h without grouped-query
      attention: 8Th); the logsumexp (fp32,
      4*batch*heads*seq) and the additive causal mask HF builds (bf16, 2*batch*seq^2);
    - MLP: gate and up outputs (2Ti each), silu(gate) (2Ti), and silu(gate)*up, the
      down projection's input (2Ti): 8Ti.

    So 20Th + 4Tk + 8Ti bytes per layer (24Th + 8Ti without grouped-query attention), plus the small terms. Then the head: the
    bf16 logits (2Tv) and the fp32 log-softmax the loss backward reads (4Tv).

    Two moments bound the step's peak: the end of forward (parameters + all
    activations) and the end of backward (parameters + all gradients + the bf16
    logits, which the caller holds as an output until backward ends). In between,
    each layer's backward frees its activations (~20Th + 4Tk + 8Ti) while it allocates
    its weight gradients (2 x (4h^2 + 3hi) bytes), so the live total moves from the
    first toward the second. Transients inside one op are left out.
    """
    T = batch * seq
    kv = hidden * (kv_heads or heads) // heads
    params = vocab * hidden * 2 + layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden) + hidden
    per_layer = 20 * T * hidden + 4 * T * kv + 8 * T * intermediate + 4 * batch * heads * seq + 2 * batch * seq * seq
    head = 6 * T * vocab
    ids = 8 * T  # int64 input_ids (also the labels: one tensor)
    acts = layers * per_layer + head
    end_forward = 2 * params + ids + acts
    end_backward = 4 * params + ids + 2 * T * vocab
    return {
        "params": params,
        "param_bytes": 2 * params,
        "grad_bytes": 2 * params,
        "activation_bytes_per_layer": per_layer,
        "activation_bytes": acts,
        "end_forward_bytes": end_forward,
        "end_backward_bytes": end_backward,
        "peak_bytes": max(end_forward, end_backward),
        "sum_bytes": 4 * params + acts,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (grouped-query attention); default: --heads")
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--target", default="h100")
    ap.add_argument("--budget-gb", type=float, default=40.0)
    ap.add_argument("--solvers", default="sqrt,auto", help="comma-separated, solved in this order on one profile")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--api", metavar="SOLVER", help="also time planner.plan(..., solver=SOLVER) end to end (captures again)")
    ap.add_argument("--world-size", type=int, default=1, help="with --api: plan one rank of this many")
    ap.add_argument("--sharding", choices=("ddp", "fsdp"), help="with --api: the data-parallel engine")
    ap.add_argument("--optimizer", help="with --api: the optimizer step counted in the budget (e.g. adamw)")
    ap.add_argument("--out", help="also write the results as JSON here")
    a = ap.parse_args(argv)
    shape = dict(layers=a.layers, hidden=a.hidden, heads=a.heads, intermediate=a.intermediate, vocab=a.vocab,
                 batch=a.batch, seq=a.seq, kv_heads=a.kv_heads)
    res: dict = {"shape": shape, "target": a.target, "budget_gib": a.budget_gb, "torch": torch.__version__,
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"}
    try:
        res["revision"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        res["revision"] = "?"

    def log(msg):
        print(f"[{time.perf_counter() - start:7.1f} s, RSS {rss_gib():.2f} GiB] {msg}", flush=True)

    res["load_average_start"] = os.getloadavg()
    start = time.perf_counter()
    t0 = time.perf_counter()
    model, inputs = build(**shape)
    res["build_s"] = time.perf_counter() - t0
    log(f"built {type(model).__name__} on meta: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters")
    t0 = time.perf_counter()
    joint = capture(model, inputs)
    res["capture_s"] = time.perf_counter() - t0
    res["nodes"] = len(joint.gm.graph.nodes)
    log(f"captured {res['nodes']} nodes in {res['capture_s']:.1f} s")
    t0 = time.perf_counter()
    gp = profile_graph(joint, target=a.target)
    res["profile_s"] = time.perf_counter() - t0
    res["time_source"] = gp.time_source
    log(f"profiled in {res['profile_s']:.1f} s ({gp.time_source})")
    budget = int(a.budget_gb * GiB)
    res["plans"] = {}
    for solver in [s.strip() for s in a.solvers.split(",") if s.strip()]:
        t0 = time.perf_counter()
        try:
            p = plan_profile(gp, budget, solver=solver, time_limit_s=a.time_limit)
        except BudgetTooSmall as e:
            res["plans"][solver] = {"solve_s": time.perf_counter() - t0, "error": str(e)}
            log(f"{solver}: {e}")
            continue
        r = {
            "solve_s": time.perf_counter() - t0,
            "solver": f"{p.solver.name}: {p.solver.status}",
            "baseline_peak_gib": p.baseline_peak_bytes / GiB,
            "predicted_peak_gib": p.predicted_peak_bytes / GiB,
            "static_gib": p.static_bytes / GiB,
            "recomputed": len(p.recomputed),
            "saved": len(p.saved),
            "overhead": p.overhead,
            "recompute_time_s": p.recompute_time_s,
            "total_flops": p.total_flops,
            "fingerprint": p.fingerprint,
        }
        for key, tl in (("baseline", p.baseline_timeline), ("planned", p.timeline)):
            fwd = [row for row in tl if row[0] == "forward"]
            top = max(tl, key=lambda row: row[2])
            r[f"{key}_end_forward_gib"] = fwd[-1][2] / GiB if fwd else None
            r[f"{key}_end_backward_gib"] = tl[-1][2] / GiB
            r[f"{key}_peak_at"] = f"{top[0]} {top[1]}"
        res["plans"][solver] = r
        log(f"{solver}: {r['solver']} in {r['solve_s']:.1f} s; no-checkpoint peak {r['baseline_peak_gib']:.2f} GiB, "
            f"planned {r['predicted_peak_gib']:.2f} GiB, overhead {100 * r['overhead']:.1f}% "
            f"({r['recomputed']} recomputed, {r['saved']} saved; est. {1e3 * r['recompute_time_s']:.0f} ms on {a.target})")
    res["phases_wall_s"] = time.perf_counter() - start
    if a.api:
        import planner

        del joint, gp
        t0 = time.perf_counter()
        try:
            engine = {"world_size": a.world_size, "sharding": a.sharding} if a.sharding else {}
            if a.optimizer:
                engine["optimizer"] = a.optimizer
            p = planner.plan(model, a.budget_gb, inputs, target=a.target, solver=a.api, time_limit_s=a.time_limit,
                             **engine)
            res["api"] = {"solver": a.api, "engine": engine, "seconds": time.perf_counter() - t0, "time_source": p.time_source,
                          "baseline_peak_gib": p.baseline_peak_bytes / GiB, "predicted_peak_gib": p.predicted_peak_bytes / GiB,
                          "plan_solver": f"{p.solver.name}: {p.solver.status}"}
            log(f"planner.plan(solver={a.api!r}) end to end: {res['api']['seconds']:.1f} s, planned "
                f"{res['api']['predicted_peak_gib']:.2f} GiB ({res['api']['plan_solver']})")
        except BudgetTooSmall as e:
            res["api"] = {"solver": a.api, "seconds": time.perf_counter() - t0, "error": str(e)}
            log(f"planner.plan(solver={a.api!r}): {e}")
    res["wall_s"] = time.perf_counter() - start
    res["peak_rss_gib"] = rss_gib()
    res["load_average_end"] = os.getloadavg()
    hand = by_hand(**shape)
    res["by_hand"] = {k: (v / GiB if k.endswith("bytes") else v) for k, v in hand.items()}
    res["by_hand"]["per_layer_mib"] = hand["activation_bytes_per_layer"] / MiB
    log(f"by hand: {hand['params'] / 1e9:.3f} B params = {hand['param_bytes'] / GiB:.2f} GiB, grads "
        f"{hand['grad_bytes'] / GiB:.2f} GiB, activations {hand['activation_bytes'] / GiB:.2f} GiB "
        f"({hand['activation_bytes_per_layer'] / MiB:.0f} MiB/layer); end of forward {hand['end_forward_bytes'] / GiB:.2f} "
        f"GiB, end of backward {hand['end_backward_bytes'] / GiB:.2f} GiB, all at once {hand['sum_bytes'] / GiB:.2f} GiB")
    for solver, r in res["plans"].items():
        if "baseline_end_forward_gib" in r:
            log(f"{solver}: no-checkpoint end of forward {r['baseline_end_forward_gib']:.2f} GiB, end of backward "
                f"{r['baseline_end_backward_gib']:.2f} GiB, peak at {r['baseline_peak_at']}; planned: end of forward "
                f"{r['planned_end_forward_gib']:.2f} GiB, peak at {r['planned_peak_at']}")
    log(f"done: wall {res['wall_s']:.1f} s, peak RSS {res['peak_rss_gib']:.2f} GiB; load average (1 min) "
        f"{res['load_average_start'][0]:.1f} at start, {res['load_average_end'][0]:.1f} at end")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
