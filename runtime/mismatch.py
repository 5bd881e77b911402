"""The runtime's errors for a plan that does not fit the model it is applied to.

:class:`PlanMismatch` and its kinds; every one is a ``ValueError`` that names what
differs and says to plan again.
"""

from __future__ import annotations

from profiles.autocast_state import autocast_mismatch, step_autocast

__all__ = ["PlanMismatch", "AutocastMismatch", "check_step_autocast"]


class PlanMismatch(ValueError):
    """The plan was made for another model, another device, or the model changed since."""


class AutocastMismatch(PlanMismatch):
    """The training step runs under another ``torch.autocast`` (or none) than the plan was made under."""


def check_step_autocast(planned: str | None, module, args: tuple, kwargs: dict) -> None:
    """:class:`AutocastMismatch` when a training step of ``module`` on these inputs runs
    under another autocast than ``planned`` (``Plan.model.autocast``)."""
    why = autocast_mismatch(planned, step_autocast(module, args, kwargs))
    if why:
        raise AutocastMismatch(why)
