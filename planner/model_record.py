"""``Plan.model``: what identifies the model and the inputs a plan is for.

The runtime compares these with the model it is applied to (``runtime.module``)
and names the first difference when they do not match.
"""

from __future__ import annotations

import torch

from profiles.autocast_state import step_autocast
from profiles.joint import JointGraph
from profiles.signature import describe_inputs, parameter_signature

from .plan_type import ModelInfo

__all__ = ["model_info"]


def model_info(model: torch.nn.Module, captured: JointGraph, args: tuple, kwargs: dict) -> ModelInfo:
    """The record of ``model`` called with ``args``/``kwargs``, whose step is ``captured``."""
    return ModelInfo(
        fingerprint=captured.fingerprint,
        class_name=type(model).__name__,
        inputs=describe_inputs(args, kwargs),
        structure=captured.structure,
        graph=captured.node_digests,
        parameters=parameter_signature(model),
        autocast=step_autocast(model, args, kwargs),
        repeated=captured.repeated or None,
    )
