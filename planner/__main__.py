"""``python -m planner``: only the entry point of the ``planner`` command, which lives in the tool layer
(:mod:`runtime.tools.cli`, above the runtime). Nothing imports this module; it runs that package as ``__main__``,
so the planner itself imports nothing above it.
"""

import runpy

__all__: list[str] = []

runpy.run_module("runtime.tools.cli", run_name="__main__", alter_sys=True)
