"""Name the ``torch.autocast`` a training step runs under, and say how two differ.

Autocast changes the captured graph (casts, matmuls in bf16/fp16), so its memory
and its numbers: a plan holds only under the autocast it was made under. A plan
records :func:`autocast_state` at capture time (``Plan.model.autocast``) and the
runtime compares it with the state of each training call
(:func:`autocast_mismatch`). The state is a string: ``"off"``, or
``"DEVICE_TYPE:DTYPE"`` such as ``"cpu:bfloat16"`` or ``"cuda:float16"``, for the
device type the step runs on. Meta tensors are never autocast, so a model
captured on the meta device records ``"off"``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ._torch_private import tree_leaves

__all__ = ["AUTOCAST_OFF", "autocast_state", "step_autocast", "autocast_mismatch", "under_autocast"]

#: The state of a step that runs without autocast.
AUTOCAST_OFF = "off"


def autocast_state(device_type: str) -> str:
    """``"off"``, or ``"DEVICE_TYPE:DTYPE"`` when ``torch.autocast`` is enabled for
    ``device_type`` here (e.g. ``"cpu:bfloat16"``)."""
    if device_type == "meta":  # autocast has no meta dispatch key: it never casts meta tensors
        return AUTOCAST_OFF
    if not torch.is_autocast_enabled(device_type):
        return AUTOCAST_OFF
    return f"{device_type}:{str(torch.get_autocast_dtype(device_type)).removeprefix('torch.')}"


def _device_type(model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    """The device type a step of ``model`` runs on: its first parameter's, else its
    first tensor input's, else the CPU."""
    for t in model.parameters():
        return t.device.type
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            return t.device.type
    return "cpu"


def step_autocast(model: torch.nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None) -> str:
    """:func:`autocast_state` for the device a step of ``model`` on these inputs runs on."""
    return autocast_state(_device_type(model, args, kwargs or {}))


def _describe(state: str) -> str:
    if state == AUTOCAST_OFF:
        return "without autocast"
    device_type, _, dtype = state.partition(":")
    return f'under torch.autocast("{device_type}", dtype=torch.{dtype})'


def _how_to_plan(state: str) -> str:
    if state == AUTOCAST_OFF:
        return "call planner.plan(model, budget_gb, inputs) outside torch.autocast"
    return f"with {_describe(state).removeprefix('under ')}: plan = planner.plan(model, budget_gb, inputs)"


def autocast_mismatch(planned: str | None, running: str) -> str:
    """"" when a plan made under autocast state ``planned`` (``None``: not recorded,
    not checked) holds for a step running under ``running``; otherwise which
    differs and what to do."""
    if planned is None or planned == running:
        return ""
    return (
        f"this plan was made {_describe(planned)} but this training step runs {_describe(running)}; autocast changes "
        "the step's graph, memory and numbers, so the plan does not hold for it: plan again under the autocast you "
        f"train with ({_how_to_plan(running)}), or run the step {_describe(planned)}"
    )


def under_autocast(state: str | None):
    """A context that runs code under autocast ``state`` (``"off"`` or None: without)."""
    if state is None or state == AUTOCAST_OFF:
        return contextlib.nullcontext()
    device_type, _, dtype = state.partition(":")
    return torch.autocast(device_type, dtype=getattr(torch, dtype))
