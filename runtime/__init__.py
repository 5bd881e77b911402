"""Apply a plan: ``apply(model, plan)`` returns a module that trains within the budget."""

from .module import PlanMismatch, PlannedModule, apply

__all__ = ["apply", "PlannedModule", "PlanMismatch"]
