"""Apply a plan: ``apply(model, plan)`` returns a module that trains within the budget."""

from .fsdp_blocks import fully_shard_blocks
from .module import AutocastMismatch, BudgetWarning, PlanMismatch, PlannedModule, ShapeEntry, ShapeWarning, apply

__all__ = ["apply", "PlannedModule", "ShapeEntry", "PlanMismatch", "AutocastMismatch", "ShapeWarning", "BudgetWarning",
           "fully_shard_blocks"]
