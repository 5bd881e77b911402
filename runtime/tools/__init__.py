"""The tools above the runtime: the ``planner`` command line (:mod:`runtime.tools.cli`) and
:func:`runtime.tools.verify.verify`, which runs a plan against a real step.

They import ``profiles``, ``planner`` and ``runtime``; nothing below imports them
(``runtime/__init__`` does not import this package).
"""

__all__: list[str] = []
