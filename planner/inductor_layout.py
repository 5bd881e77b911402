"""A plan compiled by Inductor for a graph that convolves on the CPU: its layout, budget margin and warning.

Inductor lays convolutions out channels-last on the CPU, which is faster (without
it a ResNet-18-like net's step took 6% longer) and as accurate as eager (without it,
Inductor's convolution weight gradients were 500x further from a float64 reference
on that net), but copies the convolutions' weights and the inputs they read,
copies the op-by-op simulation does not make. :func:`layout_choice` says how to
plan such a graph: with the layouts, their copies counted as they live and the
step simulated as Inductor runs it (:func:`with_layout_copies`:
:mod:`planner.layout_copies`, :mod:`planner.inductor_fusion`); without them
(``layout_optimization=False``: no copies, a slower and less accurate step, the
graphs simulated op by op) only when the compile options given to ``plan()`` ask
for it. Either way a value read by several kernels is stored once
(:data:`profiles.inductor_conv.CONV_CPU_OPTIONS`).
The plan records the options its peak assumes (``Plan.inductor_options``), which
the runtime compiles with. Inductor orders the backward graph itself, which the
plan's budget leaves :data:`INDUCTOR_CONV_CPU_MARGIN` for (:func:`budget_margin`).
Compile options that undo those settings warn (:func:`warn_unmodelled_layouts`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

from profiles.graph_profile import GraphProfile
from profiles.inductor_conv import CONV_CPU_OPTIONS, graph_convolves, unmodelled_options
from profiles.joint import JointGraph

from .distributed import EngineBytes
from .layout_copies import channels_last_temps, layout_copies

__all__ = ["INDUCTOR_CONV_CPU_MARGIN", "LAYOUT_OFF_OPTIONS", "InductorLayoutWarning", "warn_unmodelled_layouts",
           "budget_margin", "layout_choice", "with_layout_copies"]

#: Fraction of the budget a plan compiled by Inductor for a graph that convolves on
#: the CPU leaves unused (besides the CPU's own margin): Inductor orders the backward
#: graph itself, and a ResNet-18-like net measured up to 2.8% above the simulated peak.
INDUCTOR_CONV_CPU_MARGIN = 0.04

#: The options of a plan for such a graph made with ``compile_options={"layout_optimization": False}``.
LAYOUT_OFF_OPTIONS = {"layout_optimization": False, **CONV_CPU_OPTIONS}


class InductorLayoutWarning(UserWarning):
    """A plan for Inductor on the CPU whose graph convolves, compiled with options that
    undo the ones its predicted peak assumes: Inductor then keeps buffers the planner
    does not simulate, so the measured peak can exceed the budget."""


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
            "the planner does not simulate (a value read by several kernels recomputed in each, its inputs alive "
            "until the last: 0.36 MiB above the predicted peak on a ResNet-18-like net, README, Compiling with "
            "Inductor). Leave these options unset, or plan this model op by op (executor='eager').",
            InductorLayoutWarning,
            stacklevel=3,
        )


def budget_margin(joint: JointGraph, device_type: str) -> float:
    """The fraction of the budget a plan for ``joint`` on ``device_type`` leaves unused
    besides the allocator's margin: :data:`INDUCTOR_CONV_CPU_MARGIN` for Inductor's
    graph that convolves on the CPU, else 0."""
    return INDUCTOR_CONV_CPU_MARGIN if _conv_on_cpu(joint, device_type) else 0.0


def layout_choice(joint: JointGraph, device_type: str, layout_optimization: bool | None = None) -> tuple:
    """How to plan ``joint``'s step: the ``Plan.inductor_options`` its peak assumes. ``()``
    unless ``joint`` is Inductor's graph that convolves on the CPU; then with the
    channels-last layouts (:data:`CONV_CPU_OPTIONS`), or without them when
    ``layout_optimization`` (from the compile options) is False."""
    if not _conv_on_cpu(joint, device_type):
        return ()
    if layout_optimization is False:
        return tuple(LAYOUT_OFF_OPTIONS.items())
    return tuple(CONV_CPU_OPTIONS.items())


def with_layout_copies(engine: EngineBytes | None, gp: GraphProfile,
                       inductor_options) -> tuple[EngineBytes | None, GraphProfile]:
    """``(engine, gp)`` as the simulator takes them for a plan compiled with
    ``inductor_options`` (a dict or ``Plan.inductor_options``): for a conv plan with
    layouts, ``engine``'s bytes (None: none) with the channels-last copies of ``gp``'s
    graph as they live (:mod:`planner.layout_copies`), and ``gp`` with its convolutions'
    temporaries on channels-last inputs; else both unchanged."""
    options = dict(inductor_options)
    if not options or options.get("layout_optimization") is False:
        return engine, gp
    copies = layout_copies(gp)
    engine = engine if engine is not None else EngineBytes(forward=0, backward=0, end=0, optimizer=0)
    return replace(engine, layout=copies), channels_last_temps(gp)
