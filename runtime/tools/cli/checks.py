"""Checks of the command line's values (budgets, time limit, target, output paths) and the one error they raise.

A value that does not pass raises :class:`CliError`: one line saying what to
give instead, printed by ``planner`` with exit status 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planner.units import GiB
from profiles import available_targets, load_device_profile

__all__ = [
    "CliError",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERNAL",
    "MAX_BUDGET_GB",
    "budget",
    "budget_list",
    "check_time_limit",
    "target",
    "check_output_path",
    "check_plot_path",
    "describe",
    "first_line",
]

#: Exit statuses: done; ``verify`` found the budget broken or gradients unequal;
#: bad input; an unexpected error.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
MAX_BUDGET_GB = 2.0**20  # a PiB: anything above is a unit mistake


class CliError(Exception):
    """Bad input: printed as one line, exit status 2."""


def budget(text: str, flag: str = "--budget-gb") -> float:
    """``text`` as a budget in GiB: a finite number above one byte and at most a PiB."""
    try:
        value = float(text)
    except ValueError as e:
        raise CliError(f"{flag} must be a number of GiB such as 0.5, not {text!r}") from e
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise CliError(f"{flag} must be a finite number of GiB above 0, not {text!r}")
    if value > MAX_BUDGET_GB:
        raise CliError(f"{flag} {text} GiB is over a PiB; give the budget in GiB (2**30 bytes), e.g. 0.5")
    if int(value * GiB) < 1:
        raise CliError(f"{flag} {text} GiB is less than one byte; give the budget in GiB (2**30 bytes), e.g. 0.5")
    return value


def budget_list(text: str) -> list[float]:
    """``--budgets 0.2,0.3,0.5`` as GiB values, each checked by :func:`budget`."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CliError(f"--budgets needs comma-separated GiB values such as 0.2,0.3,0.5, not {text!r}")
    return [budget(t, "--budgets") for t in items]


def check_time_limit(seconds: float) -> None:
    """``--time-limit`` must be a positive, finite number of seconds."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise CliError(f"--time-limit must be a positive number of seconds, not {seconds!r}")


def target(name: str | None, budget_gb: Sequence[float] = ()) -> str | None:
    """``--target``: a shipped device profile or a profile JSON that loads, with memory
    for each of ``budget_gb``; ``None`` stays ``None`` (the model's own device)."""
    if name is None:
        return None
    names = available_targets()
    if name.lower() not in names and not (name.endswith(".json") and Path(name).is_file()):
        hint = "; a profile JSON path must end in .json and exist" if name.endswith(".json") else ""
        raise CliError(f"unknown target {name!r}: choose one of {', '.join(names)} or give a device profile JSON path{hint}")
    try:
        profile = load_device_profile(name)
    # What reading a profile file raises: OSError (unreadable), ValueError (not UTF-8,
    # not JSON, unknown fields), TypeError (a missing or extra field; JSON that is a
    # number or an array), AttributeError (JSON that is a string or a non-empty array:
    # DeviceProfile.from_dict calls d.get on it).
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CliError(f"cannot read device profile {name!r}: {e}") from e
    memory = profile.memory_bytes or 0
    for b in budget_gb:
        if memory and b * GiB > memory:
            raise CliError(
                f"budget {b:g} GiB is more than the {memory / GiB:.0f} GiB of memory of target {profile.name!r}; "
                "give the budget in GiB for one training step on that device"
            )
    return name


def check_output_path(path: str | None) -> None:
    """An output file's folder must exist (checked before any work)."""
    if path and not Path(path).resolve().parent.is_dir():
        raise CliError(f"cannot write {path}: directory {Path(path).parent} does not exist")


def check_plot_path(path: str) -> None:
    """Check ``--plot PATH`` before any work: an image name in an existing folder, and matplotlib."""
    if Path(path).suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise CliError(f"--plot {path}: give a .png, .svg, .pdf or .jpg file name")
    check_output_path(path)
    try:
        import matplotlib
    except ImportError as e:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")  # files only; no window


def describe(x: Any) -> str:
    """``"a list of 3 items"``, ``"an int"``, ``"None"``: what a factory returned, in words."""
    name = type(x).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(x, (tuple, list)):
        return f"{article} {name} of {len(x)} items"
    return f"{article} {name}" if x is not None else "None"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
