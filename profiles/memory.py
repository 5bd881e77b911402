"""Measure the peak memory of a piece of work, independently of the planner.

On CPU: run it under ``torch.profiler`` with ``profile_memory=True``; allocator
events carry signed byte counts; their running sum's maximum is the peak above
what was live before (:func:`allocator_peak`). On a GPU:
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ._torch_private import allocator_events, record_function_span
from .profiler_notices import quiet_profiler_notices

__all__ = ["measure_peak", "allocator_peak", "running_peak", "running_levels", "storage_bytes"]


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

    with quiet_profiler_notices(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    peak, _ = allocator_peak(prof)
    return peak, result


def allocator_peak(prof, *, region: str | None = None) -> tuple[int, int]:
    """Peak of the running sum of a finished ``torch.profiler`` session's CPU allocator
    events (within the ``record_function`` named ``region``, when given), and how
    many frees the profiler evidently missed.

    The profiler reports an allocator event only on a thread it profiles: a block
    freed on another thread (a collective's worker, an intra-op pool) would look
    held for the rest of the session. Blocks are followed by address: one allocated
    where a live block still is proves the older was freed unseen; it leaves the
    sum from that point on (an upper bound stays an upper bound).
    """
    start, end = -1, float("inf")
    if region is not None:
        span = record_function_span(prof, region)
        if span is None:
            raise ValueError(f"no record_function named {region!r} in this profile")
        start, end = span
    return running_peak(allocator_events(prof), start=start, end=end)


def running_peak(events, *, start: float = -1, end: float = float("inf")) -> tuple[int, int]:
    """``(peak, missed frees)`` of allocator events ``(time_ns, address, signed bytes)``:
    the running sum's maximum over events timed within ``[start, end]``; see
    :func:`allocator_peak` for how missed frees are found."""
    peak = missed = 0
    for t, running, was_missed in _running(events):
        missed += was_missed
        if start <= t <= end:
            peak = max(peak, running)
    return peak, missed


def running_levels(events, times: list[float]) -> list[int]:
    """The running sum of allocator events, followed as :func:`running_peak` does,
    after the last event timed at or before each of ``times``."""
    levels, order = [0] * len(times), sorted(range(len(times)), key=lambda i: times[i])
    k, last = 0, 0
    for t, running, _ in _running(events):
        while k < len(order) and times[order[k]] < t:
            levels[order[k]] = last
            k += 1
        last = running
    for i in order[k:]:
        levels[i] = last
    return levels


def _running(events):
    """``(time, running sum after it, whether it proved a missed free)`` per event, by time."""
    live: dict[int, int] = {}
    running = 0
    for t, ptr, size in sorted(events, key=lambda e: e[0]):
        missed = 0
        if size > 0:
            if ptr in live:
                running -= live.pop(ptr)
                missed = 1
            live[ptr] = size
            running += size
        elif ptr in live:
            running -= live.pop(ptr)
        else:
            running += size  # a free of a block allocated before the session
        yield t, running, missed
