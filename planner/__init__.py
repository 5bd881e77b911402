"""Plan activation checkpointing for a memory budget.

``plan(model, budget_gb, example_inputs)`` returns a :class:`Plan`: which forward
values to keep for backward and which to recompute, found by an ILP (PuLP) or the
sqrt(L) heuristic, with peaks checked by exact liveness simulation.
"""

from .api import SOLVERS, BudgetTooSmall, PreparedStep, minimum_budget_bytes, plan, plan_profile, prepare
from .batch import BatchFit, fit_batch
from .plan_type import GiB, SCHEMA_VERSION, DistributedInfo, ModelInfo, NodeDecision, Plan, SolverInfo
from .inductor_layout import InductorLayoutWarning
from .loss_phase import LossNotCountedWarning
from .optimizer_memory import OptimizerSpec
from .resimulation import LoopNotResimulated, resimulate
from .training_loop import TrainingLoopInfo

__all__ = [
    "plan",
    "plan_profile",
    "prepare",
    "PreparedStep",
    "fit_batch",
    "BatchFit",
    "minimum_budget_bytes",
    "resimulate",
    "LoopNotResimulated",
    "Plan",
    "ModelInfo",
    "DistributedInfo",
    "NodeDecision",
    "SolverInfo",
    "TrainingLoopInfo",
    "OptimizerSpec",
    "LossNotCountedWarning",
    "InductorLayoutWarning",
    "BudgetTooSmall",
    "SOLVERS",
    "SCHEMA_VERSION",
    "GiB",
]
