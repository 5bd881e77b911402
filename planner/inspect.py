"""Look at a plan: one import for the notebook helpers (rendering, sweeps, units).

The functions live in :mod:`planner.view` (headline, tables, the memory timeline and
its plot), :mod:`planner.sweep` (plans at several budgets), :mod:`planner.batch` (the largest batch that fits) and :mod:`planner.units`
(``format_bytes``, ``format_flops``); this module re-exports them as
``planner.inspect.<name>``. Running a plan against a real step is
:func:`runtime.tools.verify.verify` (a tool above the runtime, so not here).
"""

from __future__ import annotations

from .batch import BatchFit, BatchPoint, fit_batch
from .sweep import Sweep, SweepPoint, sweep
from .units import format_bytes, format_flops
from .view import headline, html, memory_timeline, plot, summary, table

__all__ = [
    "memory_timeline",
    "plot",
    "table",
    "html",
    "headline",
    "summary",
    "sweep",
    "Sweep",
    "SweepPoint",
    "fit_batch",
    "BatchFit",
    "BatchPoint",
    "format_bytes",
    "format_flops",
]
