"""The measured peak of one training step, as the bench scripts take it.

The step runs once to compile and warm up, gradients are dropped, and the step
runs again under ``profiles.measure_peak`` (the profiler's allocator events on
the CPU): its peak above the level before it, plus the bytes of ``static``
(parameters, buffers, inputs), which are live throughout.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from profiles import measure_peak, storage_bytes

__all__ = ["step_peak"]


def step_peak(model: torch.nn.Module, step: Callable[[], object], static: Iterable[torch.Tensor]) -> int:
    """Absolute peak bytes of ``step`` (one training step of ``model``, or of a module
    wrapping it), its gradients cleared before and after the measured run."""
    static_bytes = storage_bytes(list(static))
    step()  # compile, warm up
    model.zero_grad(set_to_none=True)
    delta, _ = measure_peak(step)
    model.zero_grad(set_to_none=True)
    return static_bytes + delta
