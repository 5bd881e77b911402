"""Keep the profiler's notices about its own sessions off stderr, and everything else on it.

Every ``torch.profiler`` session makes kineto (the profiler library inside
``libtorch_cpu``) log two lines at its ``USDT`` level, written by C++ straight to
file descriptor 2, so redirecting ``sys.stderr`` does not catch them::

    USDT:2026-12-01 16:46:28 14170:14170 SyncActivityProfilerHandler.cpp:52] profiler_start
    USDT:2026-12-01 16:46:28 14170:14170 SyncActivityProfilerHandler.cpp:59] profiler_stop

The first time in a process that a memory-profiling session sees a block freed that
was allocated before it started (a tensor the garbage collector frees meanwhile),
the CPU allocator logs one more, the same way::

    [W1201 20:54:16.991200582 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the
    profiling started, profiler results will not include the deallocation event

(one line). It is about the session's own results, which :mod:`profiles.memory` and
:mod:`profiles.timing` read as levels above the session's start: a free left out
only overstates them.

``KINETO_LOG_LEVEL`` cannot hide them alone: kineto's levels are VERBOSE 0, INFO 1,
WARNING 2, STAGE 3, ERROR 4, USDT 5, so a threshold above the notices (6) also hides
kineto's errors, and the variable is read once per process, at its first session.
:func:`quiet_profiler_notices` points file descriptor 2 at a scratch file while a
session runs and afterwards writes every line of it to the real stderr except
these two notices: errors and anything else printed meanwhile (Python's own
``sys.stderr`` included) come out when the session ends, in order.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

__all__ = ["quiet_profiler_notices", "is_profiler_notice"]

_NOTICE = re.compile(rb"^USDT:\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] profiler_(start|stop)\r?$")
_UNKNOWN_BLOCK = re.compile(
    rb"^\[W\d{4} \S+ CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling "
    rb"started, profiler results will not include the deallocation event\r?$"
)


def is_profiler_notice(line: bytes) -> bool:
    """Whether ``line`` (without its newline) is kineto's ``profiler_start``/``profiler_stop``
    notice or the allocator's notice of a block allocated before the session."""
    return _NOTICE.match(line) is not None or _UNKNOWN_BLOCK.match(line) is not None


def _flush_stderr() -> None:
    with contextlib.suppress(AttributeError, ValueError, OSError):  # closed or replaced streams
        sys.stderr.flush()


@contextlib.contextmanager
def quiet_profiler_notices() -> Iterator[None]:
    """Run the body with file descriptor 2 captured; on exit write what it got back
    to stderr, less the profiler's notices (:func:`is_profiler_notice`). Where there is no file descriptor 2
    (some embedded interpreters) the body runs as is. Not for use while another
    thread redirects file descriptor 2."""
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                _flush_stderr()
                os.dup2(saved, 2)
                scratch.seek(0)
                kept = [line for line in scratch.read().splitlines(keepends=True) if not is_profiler_notice(line.rstrip(b"\n"))]
                if kept:
                    os.write(2, b"".join(kept))
    finally:
        os.close(saved)
