"""Run a model under a plan: an ``nn.Module`` whose backward recomputes what the plan did not keep.

The wrapped module compiles the model with an AOTAutograd backend whose
partitioner splits the joint graph by the plan (:func:`planner.partition.split_joint`),
and runs both graphs with the boxed calling convention so every value, inputs
included, is freed after its last use. In ``eval()`` mode or under
``torch.no_grad()`` it calls the original model directly.
"""

from __future__ import annotations

import torch
from torch import nn

from planner.partition import split_joint
from planner.plan_type import Plan
from profiles._torch_private import aot_autograd, allow_recompiles, backend_error_cause, make_boxed, no_ddp_graph_split
from profiles.capture import graph_fingerprint, prepare_joint

from .distributed import check_wrapping

__all__ = ["PlannedModule", "PlanMismatch", "apply"]


class PlanMismatch(ValueError):
    """The plan was made for another model or other input shapes."""


def _boxed_compiler(gm, example_inputs):
    return make_boxed(gm)


class PlannedModule(nn.Module):
    """``model`` trained under ``plan``; shares its parameters and buffers."""

    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a planner.Plan, not {type(plan).__name__}")
        check_wrapping(model)
        self.module = model
        self.plan = plan
        recompute = frozenset(plan.recomputed)
        expected = plan.fingerprint
        graphs: list = []
        #: (forward, backward) GraphModules of each compilation, for inspection.
        self.compiled_graphs = graphs

        def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
            got = graph_fingerprint(joint, num_fwd_outputs)
            if expected and got != expected:
                raise PlanMismatch(
                    f"this plan was made for another model or input shapes (plan fingerprint {expected}, "
                    f"this model and input {got}); plan again with planner.plan(model, budget_gb, inputs)"
                )
            prepare_joint(joint, dropout=plan.dropout, num_fwd_outputs=num_fwd_outputs)
            fwd, bwd, _ = split_joint(joint, recompute, num_fwd_outputs=num_fwd_outputs)
            graphs.append((fwd, bwd))
            return fwd, bwd

        allow_recompiles()
        backend = aot_autograd(fw_compiler=_boxed_compiler, bw_compiler=_boxed_compiler, partition_fn=partition)
        # Not a submodule: the compiled wrapper would list the parameters twice.
        object.__setattr__(self, "_compiled", torch.compile(model, backend=backend, fullgraph=True, dynamic=False))

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.module(*args, **kwargs)
        try:
            with no_ddp_graph_split():  # one graph even inside DistributedDataParallel's forward
                return self._compiled(*args, **kwargs)
        except Exception as e:
            inner = backend_error_cause(e)
            if isinstance(inner, PlanMismatch):
                if any(t.is_meta for t in self.module.parameters()):
                    raise PlanMismatch(
                        f"{inner} - the model is on the meta device, which cannot run a training step: build it "
                        "for real on the target device (or model.to_empty(device=...) and load its weights) first"
                    ) from e
                raise PlanMismatch(str(inner)) from e
            raise


def apply(model: nn.Module, plan: Plan) -> PlannedModule:
    """Wrap ``model`` so that training steps follow ``plan``."""
    return PlannedModule(model, plan)
