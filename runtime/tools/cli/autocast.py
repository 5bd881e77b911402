"""``planner plan --autocast bf16|fp16``: the ``torch.autocast`` a command plans and verifies a step under.

``planner plan`` captures the step inside ``torch.autocast(device_type, dtype)``,
the device type being where the model is (a meta-device model's: the target's,
else the CPU), so the plan records that autocast (``Plan.model.autocast``);
``planner verify`` runs its steps under the autocast the plan recorded.
"""

from __future__ import annotations

import contextlib

import torch

from profiles.device import target_device_type

__all__ = ["AUTOCAST_DTYPES", "autocast_for", "recorded_autocast"]

#: ``--autocast`` choices and the dtype each runs the autocast region in.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _device_type(model: torch.nn.Module, target_name: str | None) -> str:
    """Where the step runs: the model's device type, or for a meta-device model the target's (else the CPU)."""
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type != "meta":
        return param.device.type
    return target_device_type(target_name) if target_name is not None else "cpu"


def autocast_for(choice: str | None, model: torch.nn.Module, target_name: str | None):
    """The context ``--autocast choice`` plans under (none without the option)."""
    if choice is None:
        return contextlib.nullcontext()
    return torch.autocast(_device_type(model, target_name), dtype=AUTOCAST_DTYPES[choice])


def recorded_autocast(autocast: str | None):
    """The context a plan recorded (``Plan.model.autocast``: ``"off"``, ``None`` or
    ``"DEVICE_TYPE:DTYPE"``, e.g. ``"cpu:bfloat16"``)."""
    if autocast in (None, "off"):
        return contextlib.nullcontext()
    device_type, dtype = autocast.split(":")
    return torch.autocast(device_type, dtype=getattr(torch, dtype))
