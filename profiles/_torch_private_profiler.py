"""The private torch APIs of the profiler: allocator events and ranges of a finished session.

Part of :mod:`profiles._torch_private` (which re-exports every name here), kept in
its own file: ``torch.profiler``'s public events carry neither allocation
addresses nor byte counts on the clock of ``record_function`` ranges.
"""

from __future__ import annotations

import torch

__all__ = ["profiler_active", "allocator_events", "record_function_span", "record_function_ranges",
           "profiler_cpu_memory_events"]


def profiler_active() -> bool:
    """Whether a ``torch.profiler``/autograd profiler session is running: a nested
    session would end the caller's. Private: the only query torch offers."""
    return bool(torch._C._autograd._profiler_enabled())


def _event_tree(prof):
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.children)


def allocator_events(prof) -> list[tuple[int, int, int]]:
    """``(start ns, address, signed bytes)`` of every CPU allocator event of a
    finished ``torch.profiler`` session (``profile_memory=True``). Private: the
    public events carry no addresses; the result's event tree does."""
    allocation = torch._C._profiler._EventType.Allocation
    return [
        (e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size)
        for e in _event_tree(prof)
        if e.tag == allocation and e.extra_fields.device.type == "cpu"
    ]


def record_function_span(prof, name: str) -> tuple[int, int] | None:
    """``(start ns, end ns)`` of the first ``record_function(name)`` range of a finished
    ``torch.profiler`` session, on the clock of :func:`allocator_events`; None if absent."""
    for e in _event_tree(prof):
        if e.name == name:
            return e.start_time_ns, e.end_time_ns
    return None


def _kineto_events(prof) -> list:
    """The events of a finished ``torch.profiler`` session, by start time. Private:
    ``kineto_results`` is the only place that gives allocator events' byte counts
    on the same clock as ``record_function`` ranges."""
    return sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())


def record_function_ranges(prof, prefix: str) -> list[tuple[int, int, str]]:
    """``(start ns, end ns, name without prefix)`` of every ``record_function`` range
    of a finished ``torch.profiler`` session whose name starts with ``prefix``, by start."""
    ranges = []
    for e in _kineto_events(prof):
        name = e.name()
        if name.startswith(prefix):
            ranges.append((e.start_ns(), e.start_ns() + e.duration_ns(), name[len(prefix):]))
    return ranges


def profiler_cpu_memory_events(prof) -> list[tuple[int, int]]:
    """``(start ns, signed bytes)`` of every CPU allocator event of a finished
    ``torch.profiler`` session (``profile_memory=True``), by time, on the clock of
    :func:`record_function_ranges`."""
    cpu = torch.autograd.DeviceType.CPU
    return [(e.start_ns(), e.nbytes()) for e in _kineto_events(prof) if e.name() == "[memory]" and e.device_type() == cpu]
