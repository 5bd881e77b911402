"""The ``planner`` command line's grammar: the argparse parser of every subcommand and its help texts.

Parse errors raise :class:`~runtime.tools.cli.checks.CliError` (one line), not
argparse's usage block.
"""

from __future__ import annotations

import argparse

from profiles import available_targets

from .autocast import AUTOCAST_DTYPES
from .batch import add_batch
from .checks import CliError
from .commands import cmd_calibrate, cmd_plan, cmd_show, cmd_sweep, cmd_targets, cmd_verify

__all__ = ["parser"]

_MODEL_HELP = "path/to/file.py:factory or package.module:factory"

_DESCRIPTIONS = {
    "plan": "Capture MODEL's training step, plan it for --budget-gb and write the plan JSON (stdout without -o). "
            "A short summary goes to stderr.",
    "show": "Print a plan: headline numbers, per-module bytes saved and recomputed, FLOPs recomputed, the largest "
            "recomputed values and totals.",
    "sweep": "Plan MODEL at several budgets and print the memory/recompute trade-off.",
    "verify": "Apply PLAN_JSON to MODEL, run one training step and compare the measured peak with the prediction and "
              "the budget, and the gradients with eager PyTorch's. Exit status 1 if the budget is broken or "
              "gradients differ.",
    "calibrate": "Measure peak matmul FLOP/s per dtype, copy bandwidth and per-op overhead on the device "
                 "at hand and write a device profile JSON that --target accepts.",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise CliError(f"{message} (see '{self.prog} --help')")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--solver", choices=["auto", "ilp", "blocks", "sqrt"], default="auto", help="default: auto (ILP, block by block for deep models; sqrt(L) if it fails)")
    p.add_argument("--target", metavar="NAME",
                   help="device profile for op times: " + ", ".join(available_targets()) + ", or a JSON path")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="S", help="solver time limit in seconds (default 60)")
    p.add_argument("--measure-time", action="store_true", help="time each op on the model's device instead of estimating")


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr (errors still print)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="plan MODEL for a budget; write the plan JSON", description=_DESCRIPTIONS["plan"])
    _model_options(p)
    p.add_argument("--budget-gb", required=True, metavar="X", help="GiB for one training step (parameters, activations, gradients...)")
    p.add_argument("-o", "--output", metavar="PATH", help="write the plan here (default: stdout)")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="data-parallel processes; the budget is then per rank")
    p.add_argument("--sharding", choices=["none", "ddp", "fsdp"], default="none", help="engine holding the model on each rank")
    p.add_argument("--fsdp-wrap", choices=["model", "blocks"], default="model",
                   help="with --sharding fsdp: one fully_shard around the model, or one per repeated block then the model "
                        "(a plan for sizing: runtime.apply refuses it)")
    p.add_argument("--optimizer", choices=["none", "adamw", "adam", "sgd"], default="none",
                   help="count this optimizer's state and its step (torch's default implementation on the model's device)")
    p.add_argument("--grad-accumulation", action="store_true",
                   help="gradients already exist when the step starts (a micro-step after the first)")
    p.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), metavar="DTYPE",
                   help="plan the step under torch.autocast(device_type, dtype), as the training loop runs it: bf16 or fp16 "
                        "(planner verify then runs under the same)")
    p.add_argument("--deepspeed", metavar="CONFIG_JSON",
                   help="DeepSpeed config (ZeRO 0-2) the model trains under: the budget is per rank and holds what the engine keeps")
    p.add_argument("--objective", choices=["time", "flops"], default="time",
                   help="minimise estimated recompute time (default) or recomputed FLOPs, then time")
    _quiet(p)
    p.set_defaults(run=cmd_plan)


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="a readable table of a plan JSON", description=_DESCRIPTIONS["show"])
    p.add_argument("plan", metavar="PLAN_JSON")
    p.add_argument("--depth", type=int, default=2, help="collapse module paths to this many parts (default 2)")
    p.add_argument("--top", type=int, default=10, help="list this many of the largest recomputed values (default 10)")
    p.add_argument("--plot", metavar="PNG", help="also draw the predicted memory timeline to this image")
    _quiet(p)
    p.set_defaults(run=cmd_show)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="plan MODEL at several budgets: the memory/recompute trade-off",
                       description=_DESCRIPTIONS["sweep"])
    _model_options(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budgets", metavar="LIST", help="comma-separated budgets in GiB, e.g. 0.2,0.3,0.5")
    g.add_argument("--points", type=int, metavar="N", help="N budgets from the minimum to the no-checkpoint peak (default 6)")
    p.add_argument("--plot", metavar="PNG", help="draw overhead against peak to this image")
    _quiet(p)
    p.set_defaults(run=cmd_sweep)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="apply a plan to MODEL, run one step, compare with the prediction and eager",
                       description=_DESCRIPTIONS["verify"])
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("plan", metavar="PLAN_JSON")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for both steps (default 0)")
    _quiet(p)
    p.set_defaults(run=cmd_verify)


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure a device profile here (matmul, copy) and write it as JSON for --target",
                       description=_DESCRIPTIONS["calibrate"])
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="where to write the profile (.json)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--matmul-size", type=int, metavar="N", help="N of the NxN matmul (default 8192 on a GPU, 1024 on CPU)")
    p.add_argument("--copy-mib", type=int, metavar="M", help="MiB copied for bandwidth (default 1024 on a GPU, 256 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median counts (default 5)")
    _quiet(p)
    p.set_defaults(run=cmd_calibrate)


def parser() -> argparse.ArgumentParser:
    """The ``planner`` parser: each subcommand sets ``run``, the function that runs it."""
    ap = _Parser(prog="planner", description="Plan activation checkpointing for a memory budget.",
                 epilog="MODEL is path/to/file.py:factory or package.module:factory; factory() returns (model, example_inputs). "
                        "Exit status: 0 done, 1 verify failed, 2 bad input, 3 unexpected error.")
    ap.add_argument("--traceback", action="store_true", help="show the traceback of an unexpected error")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_plan(sub)
    _add_show(sub)
    _add_sweep(sub)
    add_batch(sub, _model_options, _quiet)
    _add_verify(sub)
    p = sub.add_parser("targets", help="list the device profiles for --target")
    p.set_defaults(run=cmd_targets, quiet=False)
    _add_calibrate(sub)
    return ap
