"""Units for people: byte and FLOP sizes as short text, and the unit a chart or table uses.

The one place the planner turns numbers into ``"1.50 KiB"`` or ``"2.50 GFLOP"``;
the views, sweeps, the CLI and ``verify`` all format through it.
"""

from __future__ import annotations

__all__ = ["KiB", "MiB", "GiB", "format_bytes", "format_flops", "byte_unit", "percent"]

KiB = 2**10
MiB = 2**20
GiB = 2**30

_BYTE_UNITS = (("GiB", GiB), ("MiB", MiB), ("KiB", KiB))
_FLOP_UNITS = (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3))


def _scaled(n: float, units: tuple[tuple[str, float], ...], base: str) -> str:
    """``n`` in the largest of ``units`` it reaches, two decimals; else a whole number of ``base``."""
    for unit, size in units:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} {base}"


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.50 KiB"``; ``None`` -> ``"-"``."""
    return "-" if n is None else _scaled(n, _BYTE_UNITS, "B")


def format_flops(n: float | None) -> str:
    """``2.5e9`` -> ``"2.50 GFLOP"``; ``None`` -> ``"-"``."""
    return "-" if n is None else _scaled(n, _FLOP_UNITS, "FLOP")


def byte_unit(largest: float) -> tuple[str, int]:
    """The unit for a chart or table column whose largest value is ``largest`` bytes:
    ``("GiB", GiB)`` from 4 GiB up, ``("MiB", MiB)`` below."""
    return ("GiB", GiB) if largest >= 4 * GiB else ("MiB", MiB)


def percent(a: float, b: float) -> str:
    """``a`` as a percentage of ``b`` with one decimal (``"-"`` when ``b`` is 0)."""
    return f"{100 * a / b:.1f}%" if b else "-"
