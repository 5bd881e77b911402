"""The ``planner`` command line: plan a model from a factory, show, sweep and verify plans.

    planner plan MODEL --budget-gb X [--solver ilp|sqrt|auto] [--objective time|flops] [--target NAME] [-o plan.json]
    planner show plan.json [--depth N] [--top K] [--plot timeline.png]
    planner sweep MODEL (--budgets 0.2,0.3,... | --points N) [--plot tradeoff.png]
    planner verify MODEL plan.json
    planner targets
    planner calibrate -o my.json [--device cuda] [--name NAME]

MODEL is ``path/to/file.py:factory`` or ``package.module:factory``; ``factory()``
returns ``(model, example_inputs)``. Exit status: 0 done, 1 ``verify`` found the
budget broken or gradients unequal, 2 bad input (one line says what to do), 3 an
unexpected error (``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "CliError", "load_factory", "load_model", "read_plan"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
MAX_BUDGET_GB = 2.0**20  # a PiB: anything above is a unit mistake


class CliError(Exception):
    """Bad input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise CliError(f"{message} (see '{self.prog} --help')")


# -- input checks ------------------------------------------------------------------
def _budget(text: str, flag: str = "--budget-gb") -> float:
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"{flag} must be a number of GiB such as 0.5, not {text!r}") from None
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise CliError(f"{flag} must be a finite number of GiB above 0, not {text!r}")
    if value > MAX_BUDGET_GB:
        raise CliError(f"{flag} {text} GiB is over a PiB; give the budget in GiB (2**30 bytes), e.g. 0.5")
    if int(value * 2**30) < 1:
        raise CliError(f"{flag} {text} GiB is less than one byte; give the budget in GiB (2**30 bytes), e.g. 0.5")
    return value


def _time_limit(a) -> None:
    if not (a.time_limit > 0 and math.isfinite(a.time_limit)):
        raise CliError(f"--time-limit must be a positive number of seconds, not {a.time_limit!r}")


def _budget_list(text: str) -> list[float]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CliError(f"--budgets needs comma-separated GiB values such as 0.2,0.3,0.5, not {text!r}")
    return [_budget(t, "--budgets") for t in items]


def _target(name: str | None, budget_gb: Sequence[float] = ()) -> str | None:
    if name is None:
        return None
    from profiles import available_targets, load_device_profile

    names = available_targets()
    if name.lower() not in names and not (name.endswith(".json") and Path(name).is_file()):
        hint = "; a profile JSON path must end in .json and exist" if name.endswith(".json") else ""
        raise CliError(f"unknown target {name!r}: choose one of {', '.join(names)} or give a device profile JSON path{hint}")
    try:
        profile = load_device_profile(name)
    except Exception as e:
        raise CliError(f"cannot read device profile {name!r}: {e}") from None
    memory = getattr(profile, "memory_bytes", 0) or 0
    for b in budget_gb:
        if memory and b * 2**30 > memory:
            raise CliError(
                f"budget {b:g} GiB is more than the {memory / 2**30:.0f} GiB of memory of target {profile.name!r}; "
                "give the budget in GiB for one training step on that device"
            )
    return name


def load_factory(spec: str) -> Callable[[], Any]:
    """``path/to/file.py:factory`` or ``package.module:factory`` -> the factory."""
    if ":" not in spec:
        raise CliError(f"MODEL must be path/to/file.py:factory or package.module:factory, not {spec!r}")
    where, name = spec.rsplit(":", 1)
    if not where or not name.isidentifier():
        raise CliError(f"MODEL must be path/to/file.py:factory or package.module:factory, not {spec!r}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise CliError(f"no such file: {where} (MODEL is path/to/file.py:factory)")
        mod_name = f"_planner_factory_{abs(hash(str(path.resolve())))}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
        try:
            spec_.loader.exec_module(module)
        except Exception as e:
            raise CliError(f"importing {where} failed: {type(e).__name__}: {_first_line(e)}") from None
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(path.resolve().parent))
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise CliError(f"no module named {e.name!r} (importing {where}): install it, run from the directory that holds it, "
                           "or give path/to/file.py:factory") from None
        except Exception as e:
            raise CliError(f"importing {where} failed: {type(e).__name__}: {_first_line(e)}") from None
    factory = getattr(module, name, None)
    if factory is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise CliError(f"{where} has no {name!r}" + (f"; it defines {', '.join(found)}" if found else ""))
    if not callable(factory):
        raise CliError(f"{where}:{name} is a {type(factory).__name__}, not a function returning (model, example_inputs)")
    return factory


def load_model(spec: str):
    """Call the factory named by ``spec``; check it returned ``(model, example_inputs)``."""
    import torch

    factory = load_factory(spec)
    try:
        result = factory()
    except Exception as e:
        raise CliError(f"{spec}() raised {type(e).__name__}: {_first_line(e)}") from None
    want = "(model, example_inputs): an nn.Module and a tuple, dict or tensor of inputs"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise CliError(f"{spec}() must return {want}; it returned {_describe(result)}")
    model, inputs = result
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{spec}() must return {want}; its first item is {_describe(model)}")
    if not (inputs is None or isinstance(inputs, (tuple, list, dict, torch.Tensor))):
        raise CliError(f"{spec}() must return {want}; its second item is {_describe(inputs)}")
    return model, (tuple(inputs) if isinstance(inputs, list) else inputs)


def read_plan(path: str):
    """Read and check a plan JSON file; any problem is a :class:`CliError`."""
    from .plan_type import Plan

    p = Path(path)
    if not p.is_file():
        raise CliError(f"no plan file at {path} (write one with 'planner plan MODEL --budget-gb X -o {path}')")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path} is a binary file, not a plan JSON (written by 'planner plan ... -o plan.json')") from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise CliError(f"{path} is empty, not a plan: write one with 'planner plan MODEL --budget-gb X -o {path}'")
    if not text.lstrip().startswith(("{", "[")):
        raise CliError(f"{path} is not JSON, so not a plan; plans are written by 'planner plan MODEL --budget-gb X -o plan.json'")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{path} is truncated or invalid JSON ({e}); write it again with 'planner plan ... -o {path}'") from None
    if not isinstance(data, dict) or "schema_version" not in data or "nodes" not in data:
        raise CliError(f"{path} is JSON but not a plan (no 'schema_version' and 'nodes'); plans are written by 'planner plan'")
    try:
        return Plan.from_dict(data)
    except ValueError as e:
        raise CliError(f"{path}: {e}") from None


def _describe(x: Any) -> str:
    name = type(x).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(x, (tuple, list)):
        return f"{article} {name} of {len(x)} items"
    return f"{article} {name}" if x is not None else "None"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- output --------------------------------------------------------------------------
class _Out:
    """Where messages go: results to stdout, summaries and progress to stderr."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        err = sys.stderr
        self.progress = not quiet and hasattr(err, "isatty") and err.isatty()

    def say(self, msg: str) -> None:
        """A summary line (stderr), unless --quiet."""
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def step(self, msg: str) -> None:
        """A progress line: only on a terminal and without --quiet."""
        if self.progress:
            print(f"[planner] {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def busy(self):
        """Run library code: what it prints at the C level (profiler notices, the
        solver's banner) goes to a scratch file, so stdout holds only results;
        Python-level output goes to stderr on a terminal, nowhere otherwise."""
        with _native_output_hidden(keep_python_stderr=self.progress):
            yield


@contextlib.contextmanager
def _native_output_hidden(*, keep_python_stderr: bool):
    py_out, py_err = sys.stdout, sys.stderr
    for s in (py_out, py_err):
        with contextlib.suppress(Exception):
            s.flush()
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:  # no real file descriptors (embedded interpreters)
        yield
        return
    visible = None
    try:
        err_is_fd2 = py_err.fileno() == 2
    except Exception:
        err_is_fd2 = False
    with tempfile.TemporaryFile() as scratch:
        try:
            if keep_python_stderr:
                if err_is_fd2:  # sys.stderr would follow fd 2 into the scratch file
                    visible = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding=getattr(py_err, "encoding", None) or "utf-8")
                    sys.stderr = visible
            else:
                sys.stderr = io.StringIO()
            sys.stdout = sys.stderr
            os.dup2(scratch.fileno(), 1)
            os.dup2(scratch.fileno(), 2)
            yield
        finally:
            for s in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    s.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sys.stdout, sys.stderr = py_out, py_err
            if visible is not None:
                visible.close()


def _check_plot_path(path: str) -> None:
    """Check ``--plot PATH`` before any work: an image name in an existing folder, and matplotlib."""
    if Path(path).suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise CliError(f"--plot {path}: give a .png, .svg, .pdf or .jpg file name")
    _check_output_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no window
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None


def _write_plot(ax, path: str, out: _Out) -> None:
    ax.figure.savefig(path, dpi=120)
    out.say(f"wrote {path}")


# -- commands ------------------------------------------------------------------------------
def _cmd_plan(a, out: _Out) -> int:
    budget = _budget(a.budget_gb)
    _time_limit(a)
    target = _target(a.target, [budget])
    _check_output_path(a.output)
    out.step(f"loading {a.model}")
    with out.busy():
        model, inputs = load_model(a.model)
        p = _plan(model, budget, inputs, a, target, out)
    text = p.to_json()
    if a.output:
        Path(a.output).write_text(text + "\n")
    else:
        print(text, flush=True)
    out.say(_plan_summary(p) + (f"\nwrote {a.output}" if a.output else ""))
    return EXIT_OK


def _plan(model, budget_gb: float, inputs, a, target: str | None, out: _Out):
    import planner

    try:
        per_rank = {k: getattr(a, k) for k in ("world_size", "sharding", "optimizer", "objective") if hasattr(a, k)}  # plan only
        return planner.plan(model, budget_gb, inputs, solver=a.solver, target=target, time_limit_s=a.time_limit,
                            measure_time=a.measure_time, progress=out.progress, **per_rank)
    except planner.BudgetTooSmall as e:
        raise CliError(f"{e} (--budget-gb {math.ceil(e.min_budget_bytes / 2**30 * 1e4) / 1e4:.4f} works)") from None
    except Exception as e:
        _raise_planning_error(e, model)


def _plan_summary(p) -> str:
    from .inspect import format_bytes, format_flops

    return (
        f"budget {format_bytes(p.budget_bytes)}: predicted peak {format_bytes(p.predicted_peak_bytes)}, "
        f"no-checkpoint peak {format_bytes(p.baseline_peak_bytes)}\n"
        f"recompute overhead {100 * p.overhead:.1f}% ({format_flops(p.recompute_flops)} of {format_flops(p.total_flops)}; "
        f"{len(p.recomputed)} values recomputed, {len(p.saved)} saved)\n"
        f"solver {p.solver.name}: {p.solver.status} in {p.solver.seconds:.2f} s"
    )


def _check_output_path(path: str | None) -> None:
    if path and not Path(path).resolve().parent.is_dir():
        raise CliError(f"cannot write {path}: directory {Path(path).parent} does not exist")


def _cmd_show(a, out: _Out) -> int:
    from .inspect import plot, table

    if a.depth is not None and a.depth < 1:
        raise CliError(f"--depth must be 1 or more, not {a.depth}")
    if a.top < 0:
        raise CliError(f"--top must be 0 or more, not {a.top}")
    if a.plot:
        _check_plot_path(a.plot)
    p = read_plan(a.plan)
    if a.plot:  # before the table, so `planner show ... | head` still writes it
        _write_plot(plot(p), a.plot, out)
    print(table(p, depth=a.depth, top=a.top))
    return EXIT_OK


def _cmd_sweep(a, out: _Out) -> int:
    from .inspect import sweep

    budgets = _budget_list(a.budgets) if a.budgets is not None else None
    _time_limit(a)
    if budgets is None and (a.points is None or a.points < 2):
        raise CliError(f"--points must be 2 or more, not {a.points}")
    target = _target(a.target, budgets or [])
    if a.plot:
        _check_plot_path(a.plot)
    out.step(f"loading {a.model}")
    with out.busy():
        model, inputs = load_model(a.model)
        try:
            result = sweep(model, inputs, budgets_gb=budgets, points=a.points or 6, solver=a.solver, target=target,
                           time_limit_s=a.time_limit, measure_time=a.measure_time, log=out.step)
        except Exception as e:
            _raise_planning_error(e, model)
    if a.plot:
        _write_plot(result.plot(), a.plot, out)
    print(result.table())
    return EXIT_OK


def _raise_planning_error(e: Exception, model) -> None:
    """Turn what planning raises for bad models or inputs into a CliError; re-raise the rest."""
    from profiles import CaptureError

    from runtime.partition import PlanInfeasible  # a planner bug, not bad input

    if isinstance(e, CaptureError):
        raise CliError(str(e)) from None
    if isinstance(e, (TypeError, ValueError)) and not isinstance(e, PlanInfeasible):
        raise CliError(f"cannot plan {type(model).__name__}: {_first_line(e)}") from None
    raise e


def _cmd_verify(a, out: _Out) -> int:
    import runtime

    from .inspect import verify

    p = read_plan(a.plan)
    out.step(f"loading {a.model}")
    with out.busy():
        model, inputs = load_model(a.model)
        out.step("applying the plan; one warm-up step (compiles), then measured planned and eager steps")
        try:
            result = verify(model, inputs, p, seed=a.seed)
        except runtime.PlanMismatch as e:
            raise CliError(f"{a.plan} does not fit {a.model}: {e}") from None
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_FAILED


def _cmd_targets(a, out: _Out) -> int:
    from profiles import available_targets, load_device_profile

    for name in available_targets():
        prof = load_device_profile(name)
        mem = f"{prof.memory_bytes / 2**30:.0f} GiB" if prof.memory_bytes else "-"
        print(f"{name:<10} {mem:>8}  {prof.description}")
    return EXIT_OK


def _cmd_calibrate(a, out: _Out) -> int:
    from profiles.calibrate import calibrate, write_profile

    if not a.output.endswith(".json"):
        raise CliError(f"-o {a.output}: give a .json file name (--target accepts profile paths ending in .json)")
    _check_output_path(a.output)
    for flag, value in (("--matmul-size", a.matmul_size), ("--copy-mib", a.copy_mib), ("--repeats", a.repeats)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be 1 or more, not {value}")
    try:
        prof = calibrate(device=a.device, name=a.name or Path(a.output).stem, matmul_size=a.matmul_size,
                         copy_bytes=a.copy_mib * 2**20 if a.copy_mib else None, repeats=a.repeats, log=out.say)
    except ValueError as e:
        raise CliError(str(e)) from None
    write_profile(prof, a.output)
    out.say(f"wrote {a.output}: use it as --target {a.output}")
    return EXIT_OK


# -- the parser -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="planner", description="Plan activation checkpointing for a memory budget.",
                 epilog="MODEL is path/to/file.py:factory or package.module:factory; factory() returns (model, example_inputs). "
                        "Exit status: 0 done, 1 verify failed, 2 bad input, 3 unexpected error.")
    ap.add_argument("--traceback", action="store_true", help="show the traceback of an unexpected error")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def model_options(p):
        p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory or package.module:factory")
        p.add_argument("--solver", choices=["auto", "ilp", "sqrt"], default="auto", help="default: auto (ILP, sqrt(L) if it fails)")
        p.add_argument("--target", metavar="NAME", help="device profile for op times: " + _targets_help() + ", or a JSON path")
        p.add_argument("--time-limit", type=float, default=60.0, metavar="S", help="solver time limit in seconds (default 60)")
        p.add_argument("--measure-time", action="store_true", help="time each op on the model's device instead of estimating")

    def quiet(p):
        p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr (errors still print)")

    p = sub.add_parser("plan", help="plan MODEL for a budget; write the plan JSON", description=_cmd_doc("plan"))
    model_options(p)
    p.add_argument("--budget-gb", required=True, metavar="X", help="GiB for one training step (parameters, activations, gradients...)")
    p.add_argument("-o", "--output", metavar="PATH", help="write the plan here (default: stdout)")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="data-parallel processes; the budget is then per rank")
    p.add_argument("--sharding", choices=["none", "ddp", "fsdp"], default="none", help="engine holding the model on each rank")
    p.add_argument("--optimizer", choices=["none", "adamw"], default="none", help="count this optimizer's state in the budget")
    p.add_argument("--objective", choices=["time", "flops"], default="time",
                   help="minimise estimated recompute time (default) or recomputed FLOPs, then time")
    quiet(p)
    p.set_defaults(run=_cmd_plan)

    p = sub.add_parser("show", help="a readable table of a plan JSON", description=_cmd_doc("show"))
    p.add_argument("plan", metavar="PLAN_JSON")
    p.add_argument("--depth", type=int, default=2, help="collapse module paths to this many parts (default 2)")
    p.add_argument("--top", type=int, default=10, help="list this many of the largest recomputed values (default 10)")
    p.add_argument("--plot", metavar="PNG", help="also draw the predicted memory timeline to this image")
    quiet(p)
    p.set_defaults(run=_cmd_show)

    p = sub.add_parser("sweep", help="plan MODEL at several budgets: the memory/recompute trade-off", description=_cmd_doc("sweep"))
    model_options(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budgets", metavar="LIST", help="comma-separated budgets in GiB, e.g. 0.2,0.3,0.5")
    g.add_argument("--points", type=int, metavar="N", help="N budgets from the minimum to the no-checkpoint peak (default 6)")
    p.add_argument("--plot", metavar="PNG", help="draw overhead against peak to this image")
    quiet(p)
    p.set_defaults(run=_cmd_sweep)

    p = sub.add_parser("verify", help="apply a plan to MODEL, run one step, compare with the prediction and eager",
                       description=_cmd_doc("verify"))
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory or package.module:factory")
    p.add_argument("plan", metavar="PLAN_JSON")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for both steps (default 0)")
    quiet(p)
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser("targets", help="list the device profiles for --target")
    p.set_defaults(run=_cmd_targets, quiet=False)

    p = sub.add_parser("calibrate", help="measure a device profile here (matmul, copy) and write it as JSON for --target",
                       description="Measure peak matmul FLOP/s per dtype, copy bandwidth and per-op overhead on the device "
                                   "at hand and write a device profile JSON that --target accepts.")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="where to write the profile (.json)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--matmul-size", type=int, metavar="N", help="N of the NxN matmul (default 8192 on a GPU, 1024 on CPU)")
    p.add_argument("--copy-mib", type=int, metavar="M", help="MiB copied for bandwidth (default 1024 on a GPU, 256 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median counts (default 5)")
    quiet(p)
    p.set_defaults(run=_cmd_calibrate)
    return ap


def _targets_help() -> str:
    try:
        from profiles import available_targets

        return ", ".join(available_targets())
    except Exception:  # pragma: no cover
        return "cpu, h100, ..."


def _cmd_doc(name: str) -> str:
    return {
        "plan": "Capture MODEL's training step, plan it for --budget-gb and write the plan JSON (stdout without -o). "
                "A short summary goes to stderr.",
        "show": "Print a plan: headline numbers, per-module bytes saved and recomputed, FLOPs recomputed, the largest "
                "recomputed values and totals.",
        "sweep": "Plan MODEL at several budgets and print the memory/recompute trade-off.",
        "verify": "Apply PLAN_JSON to MODEL, run one training step and compare the measured peak with the prediction and "
                  "the budget, and the gradients with eager PyTorch's. Exit status 1 if the budget is broken or "
                  "gradients differ.",
    }[name]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in argv
    argv = [x for x in argv if x != "--traceback"]  # accepted anywhere on the line
    try:
        a = _parser().parse_args(argv)
        if a.command is None:
            raise CliError("give a command: plan, show, sweep, verify, targets or calibrate (see 'planner --help')")
        return a.run(a, _Out(quiet=getattr(a, "quiet", False)))
    except CliError as e:
        print(f"planner: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("planner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`planner show plan.json | head`)
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    except Exception as e:
        if show_tb:
            traceback.print_exc()
        else:
            print(f"planner: unexpected error: {type(e).__name__}: {_first_line(e)} (run again with --traceback for details)",
                  file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
