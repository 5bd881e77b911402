"""Small models to try the planner on, as factories the CLI can load.

Each factory returns ``(model, example_inputs)`` with a fixed seed, so the same
factory always gives the same model, inputs and plan:

    planner plan examples/tiny_models.py:tiny_gpt2 --budget-gb 0.009 -o plan.json
    planner sweep examples/tiny_models.py:residual_mlp --points 5

Run ``python examples/tiny_models.py [NAME ...]`` to plan them at 60% of their
no-checkpoint peak and print the plans.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_gpt2", "small_gpt2", "residual_mlp", "ResidualMLP", "FACTORIES", "main"]


def _gpt2(*, layers: int, d: int, heads: int, vocab: int, positions: int, batch: int, seq: int):
    import transformers  # an optional dependency (installed with the test extra)

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=positions)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()  # random init: nothing is downloaded
    ids = torch.randint(0, vocab, (batch, seq))
    return model, {"input_ids": ids, "labels": ids}


def tiny_gpt2():
    """A 2-layer GPT-2 (d=64, 4 heads) on 8 sequences of 64 tokens: about 12 MiB per step."""
    return _gpt2(layers=2, d=64, heads=4, vocab=128, positions=64, batch=8, seq=64)


def small_gpt2():
    """A 4-layer GPT-2 (d=128, 4 heads) on 8 sequences of 128 tokens: about 60 MiB per step."""
    return _gpt2(layers=4, d=128, heads=4, vocab=256, positions=128, batch=8, seq=128)


class ResidualMLP(nn.Module):
    """Residual MLP blocks with dropout and LayerNorm; returns the cross-entropy loss."""

    def __init__(self, d: int = 64, blocks: int = 4, hidden: int = 256, classes: int = 8, p: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Dropout(p), nn.Linear(hidden, d))
            for _ in range(blocks)
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x, target):
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk(h)
        return nn.functional.cross_entropy(self.head(h), target)


def residual_mlp():
    """Four residual MLP blocks (d=64, hidden 256) on a batch of 512: about 4 MiB per step."""
    torch.manual_seed(0)
    model = ResidualMLP().train()
    return model, {"x": torch.randn(512, 64), "target": torch.randint(0, 8, (512,))}


FACTORIES = {"tiny_gpt2": tiny_gpt2, "small_gpt2": small_gpt2, "residual_mlp": residual_mlp}


def main(argv: list[str] | None = None) -> None:
    """Plan each named factory (default: residual_mlp and tiny_gpt2) at 60% of its no-checkpoint peak."""
    import argparse

    import planner

    ap = argparse.ArgumentParser(description="Plan the example models at 60% of their no-checkpoint peak.")
    ap.add_argument("names", nargs="*", default=["residual_mlp", "tiny_gpt2"], metavar="NAME",
                    help=f"factories to plan: {', '.join(FACTORIES)}")
    names = ap.parse_args(argv).names
    for name in names:
        if name not in FACTORIES:
            ap.error(f"unknown model {name!r}: choose from {', '.join(FACTORIES)}")
    for name in names:
        model, inputs = FACTORIES[name]()
        with planner.prepare(model, inputs) as step:  # captured once, planned at each budget (bytes)
            full = step.plan(1024 * planner.GiB)  # fits: gives the no-checkpoint peak
            try:
                p = step.plan(int(0.6 * full.baseline_peak_bytes))
            except planner.BudgetTooSmall as e:
                p = step.plan(e.min_budget_bytes)
        print(f"== {name}: planned at 60% of {full.baseline_peak_bytes / 2**20:.1f} MiB")
        print(p.explain(depth=2, top=3))
        print()


if __name__ == "__main__":
    main()
