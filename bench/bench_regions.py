"""A model that breaks the graph, planned as regions: measured peaks against the peers.

The model is Hugging Face's GPT-2 blocks (random init) called one by one, with a
``print`` after the second block and a branch on a tensor after the third, so
``torch.compile`` runs it as three regions. Peaks of one training step (CPU
allocator events plus parameters and inputs), for: eager; ``torch.compile`` with
``aot_eager`` (torch's min-cut partition, op by op); every block checkpointed
(``torch.utils.checkpoint``, non-reentrant); the planner with no recomputation;
and plans at fractions of the activation memory and at the planner's minimum, with
their predicted peaks.

    python bench/bench_regions.py [--layers 4] [--fractions 0.8,0.6,0.4]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from profiles import storage_bytes  # noqa: E402
from step_peak import step_peak  # noqa: E402


class BrokenGPT2(nn.Module):
    """GPT-2 blocks called one by one; a print and a tensor branch break the graph."""

    def __init__(self, layers: int, d: int = 128, heads: int = 4, vocab: int = 1000, positions: int = 256):
        super().__init__()
        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=positions,
                                      attn_implementation="eager")
        base = transformers.GPT2Model(cfg)
        self.wte, self.wpe, self.h, self.ln_f = base.wte, base.wpe, base.h, base.ln_f
        self.checkpointed = False

    def _block(self, i: int, x):
        if self.checkpointed:
            return checkpoint(self.h[i], x, use_reentrant=False)
        return self.h[i](x)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        x = self._block(0, x)
        x = self._block(1, x)
        print("half way", file=sys.stderr)
        x = self._block(2, x)
        if x.abs().mean() > 0:  # a tensor branch: dynamo breaks here, without specialising
            x = x * 1.0
        for i in range(3, len(self.h)):  # a loop without breaks traces as one graph
            x = self._block(i, x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def measure(model, module, ids) -> int:
    def step():
        torch.manual_seed(0)
        loss = module(ids)
        loss.backward()
        return loss.detach()

    return step_peak(model, step, [*model.parameters(), ids])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--fractions", default="0.8,0.6,0.4")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BrokenGPT2(args.layers)
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    static = storage_bytes(list(model.parameters()) + [ids])
    rows = [("eager", measure(model, model, ids), None, None)]
    rows.append(("torch.compile aot_eager", measure(model, torch.compile(copy.deepcopy(model), backend="aot_eager"), ids),
                 None, None))
    ckpt = copy.deepcopy(model)
    ckpt.checkpointed = True
    rows.append(("every block checkpointed", measure(ckpt, ckpt, ids), None, None))
    with planner.prepare(model, (ids,)) as step:
        free = step.plan(2**40)
        plans = [("planner, no recomputation", free)]
        for f in map(float, args.fractions.split(",")):
            plans.append((f"planner at {f:.0%} of activations", step.plan(int(static + f * (free.baseline_peak_bytes - static)))))
        try:
            step.plan(static)
        except planner.BudgetTooSmall as e:
            plans.append(("planner at its minimum", step.plan(e.min_budget_bytes)))
    for name, p in plans:
        m = copy.deepcopy(model)
        rows.append((name, measure(m, runtime.apply(m, p), ids), p, len(p.regions)))
    print(f"BrokenGPT2: {args.layers} GPT-2 blocks (d=128, 4 heads), batch {args.batch}x{args.seq}, "
          f"{len(free.regions)} graph regions; static {static:,} B")
    print("| run | measured peak | budget | predicted | measured / predicted | recompute FLOPs |")
    print("|---|---|---|---|---|---|")
    for name, measured, p, _ in rows:
        if p is None:
            print(f"| {name} | {measured:,} | | | | |")
        else:
            print(f"| {name} | {measured:,} | {p.budget_bytes:,} | {p.predicted_peak_bytes:,} | "
                  f"{measured / p.predicted_peak_bytes:.3f} | {100 * p.overhead:.1f}% |")


if __name__ == "__main__":
    main()
