"""``python -m runtime.tools.cli``: the ``planner`` command."""

from . import main

__all__: list[str] = []

raise SystemExit(main())
