"""profiles.profiler_notices: kineto's start/stop notices are dropped, other stderr output is kept."""

from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from profiles.profiler_notices import is_profiler_notice, quiet_profiler_notices


def _session():
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        torch.ones(8).add_(1)


def test_a_plain_session_prints_the_notices(capfd):
    """What the context is for: torch 2.13 prints them on every session."""
    _session()
    err = capfd.readouterr().err
    assert "profiler_start" in err and "profiler_stop" in err


def test_notices_are_dropped_and_everything_else_is_kept_in_order(capfd):
    with quiet_profiler_notices():
        os.write(2, b"native line before\n")
        _session()
        print("python line", file=sys.stderr)
        os.write(2, b"USDT: not a notice, kept\n")
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "profiler_stop" not in err
    # pytest captures sys.stderr apart from file descriptor 2: only the native lines' order is observable here
    assert [line for line in err.splitlines() if line != "python line"] == ["native line before", "USDT: not a notice, kept"]
    assert "python line" in err.splitlines()


def test_output_survives_an_exception_in_the_body(capfd):
    try:
        with quiet_profiler_notices():
            os.write(2, b"kept despite the error\n")
            raise KeyError("boom")
    except KeyError:
        pass
    assert capfd.readouterr().err == "kept despite the error\n"


def test_the_notice_pattern():
    line = b"USDT:2026-12-01 16:46:28 14170:14170 SyncActivityProfilerHandler.cpp:52] profiler_start"
    assert is_profiler_notice(line)
    assert is_profiler_notice(line.replace(b"profiler_start", b"profiler_stop").replace(b":52]", b":59]"))
    assert not is_profiler_notice(line.replace(b"USDT", b"ERROR"))
    assert not is_profiler_notice(line + b" and more")


def test_the_allocator_notice_pattern(capfd):
    """The CPU allocator's notice (logged once per process, the first time a session sees
    a block freed that was allocated before it) is dropped too; other allocator lines are not."""
    line = (b"[W1201 20:54:16.991200582 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the "
            b"profiling started, profiler results will not include the deallocation event")
    assert is_profiler_notice(line)
    assert not is_profiler_notice(line.replace(b"CPUAllocator", b"Other"))
    with quiet_profiler_notices():
        os.write(2, line + b"\n")
        os.write(2, line[:60] + b" something else\n")
    assert capfd.readouterr().err == line[:60].decode() + " something else\n"
