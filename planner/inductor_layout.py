"""A plan compiled by Inductor for a graph that convolves on the CPU: its budget margin and its warning.

Such a graph is compiled with :data:`profiles.inductor_conv.CONV_CPU_OPTIONS` (no
channels-last layouts, a value read by several kernels stored once;
:func:`runtime.inductor.planned_options`), under which its peak is the simulated
one up to Inductor's own order of the backward graph, which the plan's budget
leaves :data:`INDUCTOR_CONV_CPU_MARGIN` for (:func:`budget_margin`). Compile
options that undo those settings warn (:func:`warn_unmodelled_layouts`).
"""

from __future__ import annotations

import warnings

from profiles.inductor_conv import graph_convolves, unmodelled_options
from profiles.joint import JointGraph

__all__ = ["INDUCTOR_CONV_CPU_MARGIN", "InductorLayoutWarning", "warn_unmodelled_layouts", "budget_margin"]

#: Fraction of the budget a plan compiled by Inductor for a graph that convolves on
#: the CPU leaves unused (besides the CPU's own margin): Inductor orders the backward
#: graph itself, and a ResNet-18-like net measured up to 2.8% above the simulated peak.
INDUCTOR_CONV_CPU_MARGIN = 0.04


class InductorLayoutWarning(UserWarning):
    """A plan for Inductor on the CPU whose graph convolves, compiled with options that
    undo :data:`profiles.inductor_conv.CONV_CPU_OPTIONS`: Inductor then keeps buffers
    the planner does not simulate, so the measured peak can exceed the budget."""


def _conv_on_cpu(joint: JointGraph, device_type: str) -> bool:
    return joint.executor == "inductor" and device_type == "cpu" and graph_convolves(joint.gm)


def warn_unmodelled_layouts(joint: JointGraph, device_type: str, compile_options: dict | None) -> None:
    """:class:`InductorLayoutWarning` when ``joint`` is Inductor's graph, convolves, the
    step runs on the CPU (``device_type``: the model's device, or for a meta-device
    model its target's), and ``compile_options`` undo the settings that keep its peak
    the simulated one."""
    undone = unmodelled_options(compile_options)
    if undone and _conv_on_cpu(joint, device_type):
        warnings.warn(
            f"planning convolutions for Inductor on the CPU with {', '.join(undone)}: Inductor then keeps buffers "
            "the planner does not simulate (channels-last copies measured up to 17% above the predicted peak on a "
            "ResNet-18-like net, README, Compiling with Inductor). Leave these options unset, or plan this model "
            "op by op (executor='eager').",
            InductorLayoutWarning,
            stacklevel=3,
        )


def budget_margin(joint: JointGraph, device_type: str) -> float:
    """The fraction of the budget a plan for ``joint`` on ``device_type`` leaves unused
    besides the allocator's margin: :data:`INDUCTOR_CONV_CPU_MARGIN` for Inductor's
    graph that convolves on the CPU, else 0."""
    return INDUCTOR_CONV_CPU_MARGIN if _conv_on_cpu(joint, device_type) else 0.0
