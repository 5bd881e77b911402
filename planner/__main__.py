"""``python -m planner``: the same as the ``planner`` command (see :mod:`planner.cli`)."""

from .cli import main

__all__: list[str] = []

raise SystemExit(main())
