"""The ``planner`` subcommands: plan, show, sweep, verify, targets, calibrate.

Each ``cmd_*`` takes the parsed arguments and an :class:`~runtime.tools.cli.output.Out`,
prints its result and returns the exit status; bad input raises
:class:`~runtime.tools.cli.checks.CliError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import planner
from runtime.partition import PlanInfeasible
from planner.sweep import sweep
from planner.units import GiB, MiB
from planner.view import plot, table
from profiles import CaptureError, available_targets, load_device_profile
from profiles.calibrate import calibrate, write_profile
from runtime import PlanMismatch
from runtime.distributed import check_plan_wrap

from ..verify import verify
from .autocast import autocast_for, recorded_autocast
from .checks import (
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    budget,
    budget_list,
    check_output_path,
    check_plot_path,
    check_time_limit,
    first_line,
    target,
)
from .loading import load_model, read_plan
from .output import Out, write_plot

__all__ = ["cmd_plan", "cmd_show", "cmd_sweep", "cmd_verify", "cmd_targets", "cmd_calibrate", "planning_errors"]


@contextlib.contextmanager
def planning_errors(model) -> Iterator[None]:
    """What planning raises for bad models or inputs becomes a CliError: a capture
    error, or a TypeError/ValueError other than PlanInfeasible (a planner bug, not
    bad input, so it propagates with everything else)."""
    try:
        yield
    except CaptureError as e:
        raise CliError(str(e)) from e
    except PlanInfeasible:
        raise
    except (TypeError, ValueError) as e:
        raise CliError(f"cannot plan {type(model).__name__}: {first_line(e)}") from e


def _plan(model, budget_gb: float, inputs, loss_fn, a, target_name: str | None, out: Out) -> planner.Plan:
    """``planner.plan`` with the command's options; a budget below the minimum names one that works."""
    per_rank = {k: getattr(a, k) for k in ("world_size", "sharding", "fsdp_wrap", "optimizer", "objective", "grad_accumulation",
                                           "deepspeed")}
    if loss_fn is not None:
        per_rank["loss_fn"] = loss_fn
    with planning_errors(model), autocast_for(a.autocast, model, target_name):
        try:
            return planner.plan(model, budget_gb, inputs, solver=a.solver, target=target_name, time_limit_s=a.time_limit,
                                measure_time=a.measure_time, progress=out.progress, **per_rank)
        except planner.BudgetTooSmall as e:
            works = math.ceil(e.min_budget_bytes / GiB * 1e4) / 1e4
            raise CliError(f"{e} (--budget-gb {works:.4f} works)") from e


def cmd_plan(a, out: Out) -> int:
    """Plan MODEL for --budget-gb; the JSON to -o or stdout, the summary to stderr."""
    budget_gb = budget(a.budget_gb)
    check_time_limit(a.time_limit)
    target_name = target(a.target, [budget_gb])
    check_output_path(a.output)
    out.step(f"loading {a.model}")
    with out.busy():
        model, inputs, loss_fn = load_model(a.model)
        p = _plan(model, budget_gb, inputs, loss_fn, a, target_name, out)
    text = p.to_json()
    if a.output:
        Path(a.output).write_text(text + "\n")
    else:
        print(text, flush=True)
    out.say(p.summary() + (f"\nwrote {a.output}" if a.output else ""))
    return EXIT_OK


def cmd_show(a, out: Out) -> int:
    """Print a plan's table; with --plot, draw its memory timeline too."""
    if a.depth is not None and a.depth < 1:
        raise CliError(f"--depth must be 1 or more, not {a.depth}")
    if a.top < 0:
        raise CliError(f"--top must be 0 or more, not {a.top}")
    if a.plot:
        check_plot_path(a.plot)
    p = read_plan(a.plan)
    if a.plot:  # before the table, so `planner show ... | head` still writes it
        write_plot(plot(p), a.plot, out)
    print(table(p, depth=a.depth, top=a.top))
    return EXIT_OK


def cmd_sweep(a, out: Out) -> int:
    """Plan MODEL at several budgets; print the trade-off, draw it with --plot."""
    budgets = budget_list(a.budgets) if a.budgets is not None else None
    check_time_limit(a.time_limit)
    if budgets is None and (a.points is None or a.points < 2):
        raise CliError(f"--points must be 2 or more, not {a.points}")
    target_name = target(a.target, budgets or [])
    if a.plot:
        check_plot_path(a.plot)
    out.step(f"loading {a.model}")
    with out.busy():
        model, inputs, loss_fn = load_model(a.model)
        with planning_errors(model):
            result = sweep(model, inputs, budgets_gb=budgets, points=a.points or 6, solver=a.solver, target=target_name,
                           time_limit_s=a.time_limit, measure_time=a.measure_time, log=out.step, loss_fn=loss_fn)
    if a.plot:
        write_plot(result.plot(), a.plot, out)
    print(result.table())
    return EXIT_OK


def cmd_verify(a, out: Out) -> int:
    """Apply PLAN_JSON to MODEL and run one step against eager; exit 1 if it fails."""
    p = read_plan(a.plan)
    try:
        check_plan_wrap(p)  # a plan for per-block FSDP2 sizes a run; it cannot be applied
    except ValueError as e:
        raise CliError(f"cannot verify {a.plan}: {e}") from e
    out.step(f"loading {a.model}")
    with out.busy():
        model, inputs, loss_fn = load_model(a.model)
        out.step("applying the plan; one warm-up step (compiles), then measured planned and eager steps")
        try:
            with recorded_autocast(p.model.autocast):
                result = verify(model, inputs, p, seed=a.seed, loss_fn=loss_fn)
        except PlanMismatch as e:
            raise CliError(f"{a.plan} does not fit {a.model}: {e}") from e
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_targets(a, out: Out) -> int:
    """List the shipped device profiles: name, memory, description."""
    for name in available_targets():
        prof = load_device_profile(name)
        mem = f"{prof.memory_bytes / GiB:.0f} GiB" if prof.memory_bytes else "-"
        print(f"{name:<10} {mem:>8}  {prof.description}")
    return EXIT_OK


def cmd_calibrate(a, out: Out) -> int:
    """Measure a device profile here and write it as JSON for --target."""
    if not a.output.endswith(".json"):
        raise CliError(f"-o {a.output}: give a .json file name (--target accepts profile paths ending in .json)")
    check_output_path(a.output)
    for flag, value in (("--matmul-size", a.matmul_size), ("--copy-mib", a.copy_mib), ("--repeats", a.repeats)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be 1 or more, not {value}")
    try:
        prof = calibrate(device=a.device, name=a.name or Path(a.output).stem, matmul_size=a.matmul_size,
                         copy_bytes=a.copy_mib * MiB if a.copy_mib else None, repeats=a.repeats, log=out.say)
    except ValueError as e:
        raise CliError(str(e)) from e
    write_profile(prof, a.output)
    out.say(f"wrote {a.output}: use it as --target {a.output}")
    return EXIT_OK
