"""The Inductor comparison of ``bench/bench_inductor.py`` on a CUDA device, in one short run.

Planned + Inductor against eager, ``torch.compile`` and ``activation_memory_budget``
on a GPT-2 four times as wide and deep as the CPU benchmark's (16 layers, d=512,
batch 8x512): peaks from ``torch.cuda.max_memory_allocated`` (plus parameters,
buffers and inputs), step times from CUDA events, median of 10 interleaved steps.
Compiling dominates the run (Triton kernels for each configuration), so the op-by-op
rows and most budget fractions are left out. Writes ``bench/results/inductor_<gpu>.json``
and prints the table for BENCHMARKS.md.

    python bench/gpu_inductor.py [--scale 4] [--steps 10] [--model gpt2|resnet|all]
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench_inductor  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "resnet", "all"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run bench/bench_inductor.py for the CPU comparison")
    name = torch.cuda.get_device_name().lower().replace(" ", "_")
    out = os.path.join(HERE, "results", f"inductor_{name}.json")
    bench_inductor.main(["--device", "cuda", "--model", args.model, "--scale", str(args.scale), "--steps", str(args.steps),
                         "--executors", "inductor", "--amb", "0.5,0.3,0.1", "--out", out])
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
