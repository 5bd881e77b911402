"""Measure the peak memory of a piece of work, independently of the planner.

On CPU: run it under ``torch.profiler`` with ``profile_memory=True``; allocator
events (``[memory]``) carry signed byte counts; their running sum's maximum is the
peak above what was live before. On a GPU: ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

__all__ = ["measure_peak", "storage_bytes"]


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (non-tensors ignored)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            key = st.data_ptr(), st.nbytes()
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


def measure_peak(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> tuple[int, Any]:
    """Run ``fn()`` and return ``(peak bytes allocated during it above the start, result)``.

    Add the bytes live before the call (parameters, inputs) to compare with the
    planner's absolute peaks.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # Raw allocator records: each ``[memory]`` event is one allocation (+) or free (-).
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        running += e.nbytes()
        peak = max(peak, running)
    return peak, result
