"""Inductor's channels-last copies of a graph that convolves on the CPU, live along the step.

With layout optimisation (the default on the CPU), Inductor copies each
convolution's weight, and a graph input a convolution reads, into the
channels-last layout in the first kernel of the forward graph, before anything
else runs; forward hands the copy to backward, and backward frees it after its
last reader there (the weight's ``convolution_backward``): ``del primals_N`` in
Inductor's generated code.
A copy backward never reads is freed as forward returns. :class:`LayoutCopies`
gives the bytes of copies live at each node of either graph, which the simulator
(:mod:`planner.simulate`) and the ILP's rows (:mod:`planner.memory_model`) add to
the step. With them, and the graphs simulated as Inductor runs them
(:mod:`planner.inductor_fusion`), the predicted peak of a ResNet-18-like net (16
images of 32x32) was at most 0.3% above the measured one at five budgets, and
equal to it on a small conv net (BENCHMARKS.md, "ResNet").

A library convolution takes other temporaries on channels-last inputs than on the
contiguous ones the op-by-op profile measures: :func:`channels_last_temps` measures
each convolution and its backward again, on channels-last synthetic inputs, and
keeps the larger of both (on channels-last inputs alone a conv net whose loss is
computed outside it measured one activation above the prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from torch import fx

from profiles.graph_profile import GraphProfile, with_temps
from profiles.inductor_conv import is_convolution
from profiles.timing import channels_last_conv_temps


__all__ = ["LayoutCopies", "layout_copies", "channels_last_temps"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LayoutCopies:
    """Bytes of the channels-last copies along a step (see the module docstring)."""

    #: Per backward node: bytes of the copies it is the last reader of (freed after it).
    freed: Mapping[str, int]
    #: Bytes of the copies backward does not read (freed as forward returns).
    forward_only: int
    #: Bytes of every copy.
    total: int

    @property
    def held(self) -> int:
        """Bytes of copies live between forward and backward."""
        return self.total - self.forward_only

    def along(self, phase: str, names: Iterable[str]) -> list[int]:
        """Bytes of copies live while each of ``names`` (a graph's nodes in run order) runs,
        in ``phase`` (``"forward"`` or ``"backward"``)."""
        if phase == "forward":
            return [self.total for _ in names]
        out = []
        live = self.held
        for name in names:
            out.append(live)
            live -= self.freed.get(name, 0)
        return out


def _copied(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """The values Inductor copies (each convolution's weight, as given to it: a parameter, or
    its cast under autocast; a graph input a convolution reads) and their bytes."""
    out: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not is_convolution(str(n.target)) or "backward" in str(n.target):
            continue
        for arg in n.args[:2]:
            val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
            if val is not None and (arg is n.args[1] or arg.op == "placeholder"):
                out[arg] = val.numel() * val.element_size()
    return out


def layout_copies(gp: GraphProfile) -> LayoutCopies:
    """The channels-last copies of ``gp``'s joint graph along its step."""
    gm = gp.gm
    forward = {name for name, ni in gp.nodes.items() if ni.phase == "forward"}
    freed: dict[str, int] = {}
    forward_only = total = 0
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for value, nbytes in _copied(gm).items():
        total += nbytes
        backward = [u for u in value.users if u.op == "call_function" and u.name not in forward]
        if backward:
            last = max(backward, key=position.__getitem__)
            freed[last.name] = freed.get(last.name, 0) + nbytes
        else:
            forward_only += nbytes
    return LayoutCopies(freed=freed, forward_only=forward_only, total=total)


def channels_last_temps(gp: GraphProfile) -> GraphProfile:
    """``gp`` with the temporaries of its convolutions and their backward the larger of its
    own and those measured on channels-last inputs (:func:`profiles.timing.channels_last_conv_temps`)."""
    measured = channels_last_conv_temps(gp.joint)
    return with_temps(gp, {name: max(temp, gp.nodes[name].temp_bytes) for name, temp in measured.items()})
