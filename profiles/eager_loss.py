"""Measure a loss the model computes eagerly, after its last graph region.

A model that breaks the graph may compute its loss in code ``torch.compile``
runs eagerly: Hugging Face's CTC loss runs inside ``torch.backends.cudnn.flags``,
which dynamo does not trace, and ``ctc_loss`` itself has an output size that
depends on the targets' values, so no graph holds it. Such a loss reads the
outputs of the compiled regions and starts backward; its own memory (what it
keeps for backward, its temporaries, the gradients it hands the regions) sits
between the regions' forward and their backward, as a ``loss_fn`` does.

:func:`loss_inputs` finds, by walking the loss's autograd graph, which region
outputs it reads (and refuses a loss that reaches a parameter outside the
regions: its gradient would come from code the planner does not see).
:func:`measure_eager_loss` runs the model's forward once more with a mark after
each region call and measures the eager code after the last mark, then the
loss's backward down to those region outputs alone (``torch.autograd.grad``):
on the CPU from ``torch.profiler`` allocator events, on CUDA from the caching
allocator's counters. The result, :class:`EagerLoss`, is bytes above the level
the last region leaves.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._torch_private import allocator_events, record_function_span
from .joint import CaptureError, EagerLoss
from .memory import running_levels, running_peak
from .profiler_notices import quiet_profiler_notices

__all__ = ["EagerLoss", "loss_inputs", "measure_eager_loss", "measure_loss_fn"]


def loss_inputs(loss: torch.Tensor, region_outputs: list[torch.Tensor], model_name: str) -> list[torch.Tensor]:
    """The tensors of ``region_outputs`` whose gradients ``loss``'s backward computes
    first: its autograd graph, walked from ``loss`` until it reaches a region
    output. ``CaptureError`` when it reaches a tensor that requires grad and no
    region computed (a parameter used eagerly, a leaf input)."""
    stops: dict[tuple[int, int], torch.Tensor] = {}
    nodes = []  # keeps the grad_fn objects alive while their ids are keys
    for t in region_outputs:
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            nodes.append(t.grad_fn)
            stops.setdefault((id(t.grad_fn), t.output_nr), t)
    stop_nodes = {k[0] for k in stops}
    reached: dict[int, torch.Tensor] = {}
    todo, seen = [(loss.grad_fn, loss.output_nr)], set()
    while todo:
        node, nr = todo.pop()
        if (id(node), nr) in stops:
            t = stops[id(node), nr]
            reached[id(t)] = t
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in stop_nodes or type(node).__name__ == "AccumulateGrad":
            raise CaptureError(
                f"{model_name} computes its loss eagerly after its last graph region (torch.compile could not "
                "resume after a graph break there) from a tensor that requires grad and no compiled region "
                f"computed ({type(node).__name__}); the planner measures such a loss only when it reads region "
                "outputs alone. Compute the loss outside the model (planner.plan(..., loss_fn=...)), or remove the "
                "graph break"
            )
        todo.extend((n, i) for n, i in node.next_functions if n is not None)
    return list(reached.values())


def measure_eager_loss(forward: Callable[[Callable[[], None]], Any], find: Callable[[Any], tuple], *,
                       device: torch.device, where: str) -> EagerLoss:
    """Run ``forward(mark)`` (the model's compiled forward; ``mark()`` is called after
    each region call returns), then ``find(outputs)`` -> ``(loss, region outputs
    it reads)`` and the loss's backward to those alone; measure what the code
    after the last ``mark()`` and that backward allocate."""
    if device.type == "cuda":
        return _measure_cuda(forward, find, device, where)
    if device.type != "cpu":
        raise CaptureError(
            f"the loss computed eagerly after the last graph region is measured by running it, on the CPU or a CUDA "
            f"device, not on {device.type}: build the model on the CPU (smaller sizes will do) to plan it, or compute "
            "the loss outside the model (planner.plan(..., loss_fn=...))"
        )
    from torch.profiler import ProfilerActivity, profile, record_function

    marks: list[str] = []

    def mark():
        marks.append(f"planner.eager_loss.{len(marks)}")
        with record_function(marks[-1]):
            pass

    with quiet_profiler_notices(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        outputs = forward(mark)
        mark()
    events = allocator_events(prof)
    start, end = record_function_span(prof, marks[-2])[1], record_function_span(prof, marks[-1])[0]
    level, after = running_levels(events, [start, end])
    forward_peak = running_peak(events, start=start, end=end)[0] - level
    loss, inputs = find(outputs)
    del outputs
    with quiet_profiler_notices(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    events = allocator_events(prof)
    saved = after - level
    peak, _ = running_peak(events)
    (left,) = running_levels(events, [max((e[0] for e in events), default=0)])
    del grads
    return EagerLoss(where=where, forward_peak_bytes=forward_peak, saved_bytes=saved,
                     backward_peak_bytes=saved + max(peak, 0), grad_bytes=saved + left)


def measure_loss_fn(loss_fn: Callable[[Any], torch.Tensor], outputs: Any, leaves: list[torch.Tensor], *,
                    device: torch.device) -> EagerLoss:
    """``loss_fn(outputs)`` run eagerly and measured as :func:`measure_eager_loss` does
    (``outputs`` hold ``leaves``, the tensors its backward ends at): for a ``loss_fn``
    that cannot be captured as a graph (``ctc_loss``). ``TypeError`` when it does not
    return a one-element tensor that requires grad."""

    def forward(mark):
        mark()
        return loss_fn(outputs)

    def find(loss):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.grad_fn is None:
            raise TypeError(
                "loss_fn must return the loss as a one-element tensor computed from the model's outputs, not "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; reduce it inside "
                "loss_fn (e.g. .mean())"
            )
        return loss, [t for t in leaves if t.requires_grad]

    return measure_eager_loss(forward, find, device=device, where="loss_fn")


def _measure_cuda(forward, find, device: torch.device, where: str) -> EagerLoss:
    """:func:`measure_eager_loss` on a CUDA device, from the caching allocator's counters."""
    levels: list[int] = []

    def mark():
        torch.cuda.synchronize(device)
        levels.append(torch.cuda.memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)

    outputs = forward(mark)
    torch.cuda.synchronize(device)
    forward_peak = torch.cuda.max_memory_allocated(device) - levels[-1]
    saved = torch.cuda.memory_allocated(device) - levels[-1]
    loss, inputs = find(outputs)
    del outputs
    mark()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - levels[-1]
    left = torch.cuda.memory_allocated(device) - levels[-1]
    del grads
    return EagerLoss(where=where, forward_peak_bytes=forward_peak, saved_bytes=saved,
                     backward_peak_bytes=saved + peak, grad_bytes=saved + left)
