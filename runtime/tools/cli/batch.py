"""The ``planner batch`` subcommand: the largest batch that fits a budget, and the one with the best estimated throughput.

MODEL's factory gives example inputs of some batch size; :func:`planner.batch.fit_batch`
plans it at growing batch sizes (the inputs' samples repeated) and the table lists
each size tried.
"""

from __future__ import annotations

import argparse

from planner.batch import fit_batch

from .checks import EXIT_OK, CliError, budget, check_plot_path, check_time_limit, target
from .commands import planning_errors
from .loading import load_model
from .output import Out, write_plot

__all__ = ["add_batch", "cmd_batch"]

_DESCRIPTION = ("Plan MODEL at growing batch sizes (the factory's inputs repeated along their first dimension) "
                "within --budget-gb: the largest batch that fits and, per batch size, the recompute overhead and "
                "estimated step time per sample; the batch with the best estimated throughput is recommended.")


def add_batch(sub, model_options, quiet) -> None:
    """Add ``batch`` to the subparsers ``sub`` (``model_options``/``quiet`` add the shared options)."""
    p = sub.add_parser("batch", help="the largest batch of MODEL that fits a budget, and the fastest per sample",
                       description=_DESCRIPTION)
    model_options(p)
    p.add_argument("--budget-gb", required=True, metavar="X", help="GiB for one training step (per rank with an engine)")
    p.add_argument("--start", type=int, default=1, metavar="B", help="first batch size tried (default 1)")
    p.add_argument("--max-batch", type=int, default=4096, metavar="B", help="largest batch size tried (default 4096)")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="data-parallel processes; the budget is then per rank")
    p.add_argument("--sharding", choices=["none", "ddp", "fsdp"], default="none", help="engine holding the model on each rank")
    p.add_argument("--fsdp-wrap", choices=["model", "blocks"], default="model",
                   help="with --sharding fsdp: one fully_shard around the model, or one per repeated block then the model")
    p.add_argument("--optimizer", choices=["none", "adamw"], default="none", help="count this optimizer's state in the budget")
    p.add_argument("--deepspeed", metavar="CONFIG_JSON", help="DeepSpeed config (ZeRO 0-2): batch sizes are its micro-batch")
    p.add_argument("--plot", metavar="PNG", help="draw estimated samples/s and recompute overhead against batch size")
    quiet(p)
    p.set_defaults(run=cmd_batch)


def cmd_batch(a: argparse.Namespace, out: Out) -> int:
    """Fit the batch size; print the table, draw it with --plot."""
    budget_gb = budget(a.budget_gb)
    check_time_limit(a.time_limit)
    for flag, v in (("--start", a.start), ("--max-batch", a.max_batch)):
        if v < 1:
            raise CliError(f"{flag} must be 1 or more, not {v}")
    if a.start > a.max_batch:
        raise CliError(f"--start {a.start} is above --max-batch {a.max_batch}")
    target_name = target(a.target, [budget_gb])
    if a.plot:
        check_plot_path(a.plot)
    out.step(f"loading {a.model}")
    kw = {k: getattr(a, k) for k in ("world_size", "sharding", "fsdp_wrap", "optimizer", "deepspeed")}
    with out.busy():
        model, inputs, loss_fn = load_model(a.model)
        if loss_fn is not None:  # its targets are those of one batch size
            raise CliError(f"{a.model} returns a loss_fn: `planner batch` grows the inputs' batch, which a loss "
                           "closed over one batch's targets cannot follow; return (model, example_inputs)")
        with planning_errors(model):
            result = fit_batch(model, budget_gb, inputs, start=a.start, max_batch=a.max_batch, solver=a.solver,
                               target=target_name, time_limit_s=a.time_limit, measure_time=a.measure_time,
                               log=out.step, **kw)
    if a.plot:
        write_plot(result.plot(), a.plot, out)
    print(result.table())
    return EXIT_OK
