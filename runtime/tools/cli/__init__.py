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

The console script ``planner`` runs :func:`main`; so do ``python -m runtime.tools.cli``
and ``python -m planner``. Modules: ``checks`` (values and :class:`CliError`),
``loading`` (factories, models, plan files), ``output`` (stdout/stderr), ``commands``
(the subcommands), ``parse`` (the parser), ``app`` (:func:`main`).
"""

from .app import main
from .checks import CliError
from .loading import load_factory, load_model, read_plan

__all__ = ["main", "CliError", "load_factory", "load_model", "read_plan"]
