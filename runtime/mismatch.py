"""The runtime's errors for a plan that does not fit the model it is applied to.

:class:`PlanMismatch` and its kinds; every one is a ``ValueError`` that names what
differs and says to plan again.
"""

from __future__ import annotations

__all__ = ["PlanMismatch", "AutocastMismatch"]


class PlanMismatch(ValueError):
    """The plan was made for another model, another device, or the model changed since."""


class AutocastMismatch(PlanMismatch):
    """The training step runs under another ``torch.autocast`` (or none) than the plan was made under."""
