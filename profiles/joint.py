"""The captured training step as data: :class:`JointGraph`, and :class:`CaptureError`
for a step that could not be captured.

Nothing here runs a model; :mod:`profiles.capture` builds these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

__all__ = ["JointGraph", "CapturedRegion", "CaptureError", "EagerLoss", "mutated_primals"]


class CaptureError(RuntimeError):
    """The model could not be captured as one forward+backward graph."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EagerLoss:
    """A loss computed eagerly after the last graph region, measured on the example inputs.

    Bytes are above the level the regions' forward leaves (every value they save,
    the outputs held)."""

    #: Where the last region before the loss was traced from ("file:line-line").
    where: str
    #: The eager code's peak between the last region's end and the forward's return.
    forward_peak_bytes: int
    #: What it holds when forward returns: what its backward reads, the loss.
    saved_bytes: int
    #: Its backward's peak (``saved_bytes`` included).
    backward_peak_bytes: int
    #: What its backward leaves: the gradients of the region outputs it read (and
    #: what it still holds).
    grad_bytes: int

    @property
    def points(self) -> tuple[tuple[str, str, int], ...]:
        """``(phase, node, bytes)`` as ``planner.loss_phase.LossPhase.points`` has them."""
        return (("loss forward", "eager loss", self.forward_peak_bytes),
                ("loss forward", "eager loss (saved)", self.saved_bytes),
                ("loss backward", "eager loss backward", self.backward_peak_bytes),
                ("loss backward", "eager loss (gradients)", self.grad_bytes))


@dataclass(frozen=True, kw_only=True, slots=True)
class CapturedRegion:
    """One region of a step that breaks the graph: a compiled piece of forward with
    its backward (:mod:`profiles.regions`)."""

    #: The region's joint graph as captured (AOTAutograd's, before ``prepare_joint``).
    raw_gm: fx.GraphModule
    #: How many of its outputs are forward outputs.
    num_fwd_outputs: int
    #: Per input of the region's graph (in the order it is called with), where the
    #: tensor comes from: ``("primal", i, 0)``, the whole step's ``i``-th primal, or
    #: ``("output", j, o)``, output ``o`` of region ``j`` (an earlier one).
    sources: tuple[tuple[str, int, int], ...]
    #: Which compiled graph this is a call of, numbered in the order torch.compile
    #: compiles them (a module that breaks the graph runs one compiled graph per call).
    graph: int
    #: The outputs (by index) the model returns to its caller, who holds them until
    #: backward ends; the others are freed after their last use.
    returned: tuple[int, ...] = ()
    #: The outputs (by index), not returned to the caller, that the loss computed
    #: eagerly after the last region reads (:mod:`profiles.eager_loss`): alive until
    #: that loss's backward ends.
    loss_read: tuple[int, ...] = ()
    #: ``signature.graph_fingerprint`` and ``structure_fingerprint`` of ``raw_gm``.
    fingerprint: str
    structure: str
    #: Where in the user's code the region's forward starts and ends ("file:line-line").
    where: str


@dataclass(frozen=True, kw_only=True, slots=True)
class JointGraph:
    """A captured training step.

    ``gm`` is the joint graph: placeholders ``primals_*`` (parameters, buffers and
    inputs, in the order the compiled forward receives them) and ``tangents_*``
    (gradients of the forward outputs); outputs are the forward outputs followed
    by the gradients of the primals.
    """

    #: The joint forward+backward graph, after ``capture.prepare_joint``.
    gm: fx.GraphModule
    #: How many of ``gm``'s outputs are forward outputs (the rest are gradients).
    num_fwd_outputs: int
    #: One entry per ``primals_*`` placeholder: "param", "buffer" or "input".
    primal_roles: list[str]
    #: Fully qualified parameter/buffer name per primal ("" for inputs).
    primal_names: list[str]
    #: The real tensors the forward was called with (emptied by ``drop_tensors``).
    primal_values: list[Any] = field(default_factory=list, repr=False)
    #: Hash of the graph as captured, shapes included (``signature.graph_fingerprint``).
    fingerprint: str = ""
    #: The fingerprint without shapes (``signature.structure_fingerprint``).
    structure: str = ""
    #: A digest per node (``signature.node_digests``), to name the first node that differs.
    node_digests: list[str] = field(default_factory=list, repr=False)
    #: How dropout was rewritten ("mask" or "replay").
    dropout: str = "mask"
    #: How many dropout ops were rewritten.
    num_dropouts: int = 0
    #: The joint graph as captured, before ``prepare_joint`` (for ``capture.with_dropout``).
    raw_gm: fx.GraphModule | None = field(default=None, repr=False)
    #: True when captured from a meta-device model on fake tensors (:mod:`profiles.meta`):
    #: shapes and dtypes only, no values to run.
    fake: bool = False
    #: What runs the split graphs: ``"eager"`` (op by op) or ``"inductor"`` (the joint
    #: graph after Inductor's decompositions and joint-graph passes, compiled by Inductor).
    executor: str = "eager"
    #: The regions the step runs as, in order, when the model breaks the graph
    #: (``gm`` is then their joint graphs stitched together, :mod:`profiles.region_stitch`);
    #: empty for a step captured as one graph.
    regions: tuple[CapturedRegion, ...] = ()
    #: The loss the model computes eagerly after its last region, measured
    #: (:mod:`profiles.eager_loss`); None when the step has none.
    eager_loss: EagerLoss | None = None
    #: Positions among ``gm``'s forward outputs of the region outputs only the eager loss
    #: reads (``CapturedRegion.loss_read``): the simulation frees them when its backward ends.
    loss_read_outputs: tuple[int, ...] = ()
    #: ``(stack path, layers traced, layers)`` when the step was traced with a few
    #: layers of a deep stack and its graph repeated to all of them
    #: (:mod:`profiles.repeat_capture`); empty when traced whole.
    repeated: tuple = ()

    def drop_tensors(self) -> None:
        """Forget the real tensors so the graph no longer keeps them alive."""
        self.primal_values.clear()


def mutated_primals(gm: fx.GraphModule, num_fwd_outputs: int) -> set[str]:
    """Names of the primal placeholders the step mutates (AOTAutograd returns their
    new values as extra forward outputs, described as ``InputMutationAOTOutput``)."""
    primals = [n for n in gm.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    out = gm.graph.find_nodes(op="output")[0]
    names = set()
    for desc in (out.meta.get("desc") or [])[:num_fwd_outputs]:
        idx = getattr(getattr(desc, "mutated_input", None), "idx", None)
        if idx is not None and idx < len(primals):
            names.add(primals[idx].name)
    return names
