"""The DeepSpeed tutorial's SimpleModel: a small MLP over token features, planned by us.

``planner plan examples/deepspeed_tutorial/simple_model.py:simple_model --budget-gb X
--deepspeed examples/deepspeed_tutorial/ds_config.json`` plans it for one rank of the
tutorial's engine (ZeRO-2, 4 accumulated micro-batches of 2 on 2 ranks, AdamW);
``train.py`` next to it trains it under ``deepspeed.initialize``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SimpleModel", "simple_model", "batch"]


class SimpleModel(nn.Module):
    """Linear layers with GELU over ``(batch, tokens, dim)`` features, mean-pooled into class logits."""

    def __init__(self, dim: int = 128, hidden: int = 512, layers: int = 4, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, y):
        h = nn.functional.gelu(self.inp(x))
        for layer in self.layers:
            h = h + nn.functional.gelu(layer(h))
        logits = self.head(h.mean(dim=1))
        return nn.functional.cross_entropy(logits.float(), y)


def batch(size: int = 2, tokens: int = 512, dim: int = 128, *, seed: int = 0, dtype=torch.float32) -> dict:
    """A micro-batch of random features and labels."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(size, tokens, dim, generator=g).to(dtype), "y": torch.randint(0, 10, (size,), generator=g)}


def simple_model():
    """The CLI factory: the model and one micro-batch (2 samples: the tutorial's 16 over 4 micro-steps and 2 ranks)."""
    torch.manual_seed(0)
    return SimpleModel().train(), batch()
