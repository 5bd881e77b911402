"""profiles.memory: the CPU peak measurement every memory claim rests on."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from profiles.memory import allocator_peak, measure_peak, running_levels, running_peak


def test_measure_peak_counts_what_is_allocated_and_freed():
    def work():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 18)  # 1 MiB, while a is live
        del a, b
        return torch.empty(1 << 16)  # 256 KiB, returned

    peak, out = measure_peak(work)
    assert peak == (1 << 22) + (1 << 20)
    assert out.numel() == 1 << 16


def test_allocator_peak_of_a_region():
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        keep = torch.empty(1 << 18)  # 1 MiB before the region, live through it
        with record_function("region"):
            tmp = torch.empty(1 << 16)  # 256 KiB
            del tmp
        big = torch.empty(1 << 20)  # after the region: not its peak
        del big
    assert allocator_peak(prof, region="region") == ((1 << 20) + (1 << 18), 0)
    assert allocator_peak(prof) == ((1 << 20) + (1 << 22), 0)
    with pytest.raises(ValueError, match="no record_function named 'other'"):
        allocator_peak(prof, region="other")
    del keep


def test_a_free_the_profiler_missed_is_found_by_the_address_reused():
    # block 1 at address 0x10 is freed on a thread the profiler does not see; a new
    # block at the same address proves it, and the sum drops it from there on
    events = [(1, 0x10, 100), (2, 0x20, 50), (3, 0x10, 100), (4, 0x30, 10), (5, 0x20, -50)]
    assert running_peak(events) == (160, 1)
    assert running_peak(events, start=1, end=2) == (150, 1)
    # frees of blocks allocated before the session count as frees
    assert running_peak([(1, 0x10, -8), (2, 0x20, 16)]) == (8, 0)


def test_running_levels_follow_the_running_sum():
    """Levels after the last event at or before each time; a block allocated at an
    address still held proves the older one freed (as running_peak counts it)."""
    events = [(10, 1, 100), (20, 2, 50), (30, 1, -100), (40, 2, 70), (50, 9, -8)]
    assert running_levels(events, [5, 10, 25, 35, 40, 60]) == [0, 100, 150, 50, 70, 62]
    assert running_peak(events) == (150, 1)
