"""The Inductor options under which a graph that convolves on the CPU peaks as simulated.

Two of Inductor's lowering choices keep buffers alive that the planner's op-by-op
simulation of the joint graph does not:

- layout optimisation (``layout_optimization``): on the CPU with mkldnn, Inductor
  lays every convolution out channels-last and copies tensors between layouts. On
  a ResNet-18-like net this measured up to 2.7 MiB (17%) above the simulated peak.
- inlining a pointwise value read by several kernels (``realize_reads_threshold``,
  4 reads by default): each consumer kernel recomputes it from its inputs, which stay
  alive until the last consumer runs, where the simulation holds the one value (a
  residual block's gradient sum read by two batch-norm backward kernels: 0.36 MiB
  more on the same net). With the threshold at 0 such a value is stored once.

:func:`conv_cpu_options` adds both settings for a graph that convolves on the CPU,
unless the options given set them; :func:`unmodelled_options` names the options
given that override them. Neither changes the joint graph the planner simulates:
both act when Inductor lowers the split graphs.
"""

from __future__ import annotations

from typing import Iterable

from torch import fx

__all__ = ["CONV_CPU_OPTIONS", "is_convolution", "graph_convolves", "ops_convolve", "conv_cpu_options", "unmodelled_options"]

#: Inductor options for a graph that convolves on the CPU (see the module docstring).
CONV_CPU_OPTIONS = {"layout_optimization": False, "realize_reads_threshold": 0}


def is_convolution(op: str) -> bool:
    """Whether operator ``op`` (as ``NodeInfo.op`` or ``NodeDecision.op`` names it,
    e.g. ``aten.convolution.default``) is a convolution or its backward."""
    return "convolution" in op


def graph_convolves(gm: fx.GraphModule) -> bool:
    """Whether graph ``gm`` calls a convolution."""
    return any(n.op == "call_function" and is_convolution(str(n.target)) for n in gm.graph.nodes)


def conv_cpu_options(options: dict | None, *, convolves: bool, device_type: str) -> dict | None:
    """``options`` with :data:`CONV_CPU_OPTIONS` added when the graph ``convolves``
    and runs on the CPU (``device_type``), the options given winning; otherwise
    ``options`` unchanged."""
    if not convolves or device_type != "cpu":
        return options
    return {**CONV_CPU_OPTIONS, **(options or {})}


def unmodelled_options(options: dict | None) -> list[str]:
    """The settings in ``options`` that undo :data:`CONV_CPU_OPTIONS` (``"key=value"``),
    layout optimisation forced on included."""
    given = options or {}
    out = [f"{k}={given[k]!r}" for k in CONV_CPU_OPTIONS if k in given and given[k] != CONV_CPU_OPTIONS[k]]
    if given.get("force_layout_optimization"):
        out.append(f"force_layout_optimization={given['force_layout_optimization']!r}")
    return out


def ops_convolve(ops: Iterable[str]) -> bool:
    """Whether any operator in ``ops`` is a convolution (:func:`is_convolution`)."""
    return any(is_convolution(op) for op in ops)
