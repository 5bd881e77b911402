"""What Inductor does to a graph that convolves on the CPU beyond the planner's simulation, and the option that stops part of it.

Two of Inductor's lowering choices keep buffers alive that the planner's op-by-op
simulation of the joint graph does not:

- layout optimisation: on the CPU with mkldnn, Inductor lays convolutions out
  channels-last. It copies each convolution's weight into that layout in forward,
  and the copies are kept for the convolutions' backward; a model input a
  convolution reads is copied likewise. Measured on ResNet-18-like nets, the step
  peaked above the op-by-op simulation by the weights' bytes plus up to the input's
  (2,846,912 B against 2,791,104 B of weights and a 196,608 B input; 3,633,344 B
  against the same weights and an 884,736 B input). The planner counts each copy
  from its first forward reader to its last backward one (:mod:`planner.layout_copies`);
  without layouts (``layout_optimization=False``, on request) the step took 6%
  longer there and Inductor's convolution weight gradients were 500x less accurate.
- inlining a pointwise value read by several kernels (``realize_reads_threshold``,
  4 reads by default): each consumer kernel recomputes it from its inputs, which stay
  alive until the last consumer runs, where the simulation holds the one value (a
  residual block's gradient sum read by two batch-norm backward kernels: 0.36 MiB
  more on the same net). With the threshold at 0 such a value is stored once, at no
  measured cost in step time.

A plan for such a graph records the options its peak assumes (``Plan.inductor_options``:
that threshold, and ``layout_optimization=False`` when the compile options asked for it;
:mod:`planner.inductor_layout`); :func:`unmodelled_options` names the options given
at planning that override the threshold. Neither changes the joint graph the planner
simulates: both act when Inductor lowers the split graphs.
"""

from __future__ import annotations

from typing import Iterable

from torch import fx

__all__ = ["CONV_CPU_OPTIONS", "is_convolution", "graph_convolves", "ops_convolve", "unmodelled_options"]

#: Inductor options for a graph that convolves on the CPU (see the module docstring).
CONV_CPU_OPTIONS = {"realize_reads_threshold": 0}


def is_convolution(op: str) -> bool:
    """Whether operator ``op`` (as ``NodeInfo.op`` or ``NodeDecision.op`` names it,
    e.g. ``aten.convolution.default``) is a convolution or its backward."""
    return "convolution" in op


def graph_convolves(gm: fx.GraphModule) -> bool:
    """Whether graph ``gm`` calls a convolution."""
    return any(n.op == "call_function" and is_convolution(str(n.target)) for n in gm.graph.nodes)


def unmodelled_options(options: dict | None, assumed: dict = CONV_CPU_OPTIONS) -> list[str]:
    """The settings in ``options`` that undo ``assumed`` (by default :data:`CONV_CPU_OPTIONS`), as ``"key=value"``."""
    given = options or {}
    return [f"{k}={given[k]!r}" for k in assumed if k in given and given[k] != assumed[k]]


def ops_convolve(ops: Iterable[str]) -> bool:
    """Whether any operator in ``ops`` is a convolution (:func:`is_convolution`)."""
    return any(is_convolution(op) for op in ops)
