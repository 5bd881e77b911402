"""Apply a plan: ``apply(model, plan)`` returns a module that trains within the budget."""

from .module import BudgetWarning, PlanMismatch, PlannedModule, ShapeWarning, apply

__all__ = ["apply", "PlannedModule", "PlanMismatch", "ShapeWarning", "BudgetWarning"]
