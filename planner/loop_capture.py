"""What ``plan(..., loss_fn=, grad_accumulation=, optimizer=)`` adds around the step, measured on the model.

:func:`loop_setup` turns ``plan()``'s training-loop options into a
:class:`~planner.training_loop.TrainingLoop` (what the simulator and the memory
model read) and what the plan records of it: the loss captured on the model's
outputs (one forward without grad, its RNG state and buffers restored), the
parameters' gradients when they are accumulated, and the optimizer's state and
step from the parameters (:mod:`planner.optimizer_memory`). Without ``loss_fn``,
when no output of the model is a one-element tensor (its loss),
:class:`~planner.loss_phase.LossNotCountedWarning` says once per call that the
loss's own memory is not in the budget.

Under a data-parallel engine the loss's forward and backward run on each rank as
in one process: the loop's points carry the engine's per-phase bytes like the
model's. Accumulated gradients are counted under DDP (``no_sync()`` micro-steps
keep every full gradient in ``param.grad``, beside the reducer's buckets, which
the engine's bytes count); :func:`check_engine_loop` refuses them where the
engine keeps them in its own buffers (FSDP2, DeepSpeed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from profiles._torch_private import tree_leaves, tree_map
from profiles.allocator import round_bytes
from profiles.capture import state_kept
from profiles.graph_profile import profile_graph
from profiles.eager_loss import measure_loss_fn
from profiles.joint import CaptureError, JointGraph

from .loss_phase import LossNotCountedWarning, capture_loss, loss_timeline
from .optimizer_memory import OPTIMIZER_NAMES, OptimizerSpec, optimizer_memory
from .training_loop import TrainingLoop, TrainingLoopInfo, loop_info

__all__ = ["LoopSetup", "loop_setup", "optimizer_spec", "check_engine_loop"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopSetup:
    """The training loop a plan is made for."""

    #: What the simulator and the memory model count.
    loop: TrainingLoop
    #: ``TrainingLoopInfo.loss``: one of ``training_loop.LOSS_SOURCES``.
    loss: str
    #: ``plan()``'s ``grad_accumulation``.
    grad_accumulation: bool
    #: The optimizer's name (``"none"`` without one) and the implementation assumed.
    optimizer: str
    implementation: str

    def info(self, timeline) -> TrainingLoopInfo:
        """The plan's record, from its predicted ``timeline``."""
        return loop_info(timeline, loss=self.loss, grad_accumulation=self.grad_accumulation, optimizer=self.optimizer,
                         implementation=self.implementation, state_bytes=self.loop.optimizer_state_bytes)


def optimizer_spec(optimizer: Any) -> OptimizerSpec | None:
    """``plan()``'s ``optimizer``: ``"none"``, a name (torch's defaults for it) or an
    :class:`~planner.optimizer_memory.OptimizerSpec`."""
    if isinstance(optimizer, OptimizerSpec):
        return optimizer
    if optimizer == "none":
        return None
    if optimizer in OPTIMIZER_NAMES:
        return OptimizerSpec(name=optimizer)
    raise ValueError(
        f"unknown optimizer {optimizer!r}: choose one of none, {', '.join(OPTIMIZER_NAMES)}, or pass "
        "planner.OptimizerSpec(name=..., implementation=..., momentum=...) for another configuration"
    )


def check_engine_loop(*, sharding: str, deepspeed: Any, grad_accumulation: bool) -> None:
    """``ValueError`` for ``grad_accumulation=True`` under an engine whose accumulated
    gradients the planner does not count exactly: FSDP2 (sharded, or unsharded under
    ``set_requires_gradient_sync(False)``) and DeepSpeed (its own buffers, counted from
    the config's ``gradient_accumulation_steps``)."""
    if not grad_accumulation:
        return
    if deepspeed is not None:
        raise ValueError(
            "grad_accumulation=True with a DeepSpeed config: DeepSpeed accumulates gradients in its own buffers, "
            "which the plan counts from the config's \"gradient_accumulation_steps\"; set that in the config and "
            "leave grad_accumulation out"
        )
    if sharding == "fsdp":
        raise ValueError(
            "grad_accumulation=True under sharding='fsdp' is not supported: what FSDP2 holds between micro-steps "
            "(sharded gradients, or unsharded ones under set_requires_gradient_sync(False)) is not modelled; plan "
            "without it and leave the held gradients' bytes free in the budget, or use sharding='ddp' (no_sync() "
            "micro-steps are counted)"
        )


def loop_setup(model: torch.nn.Module, args: tuple, kwargs: dict, captured: JointGraph, *,
               loss_fn: Callable[[Any], torch.Tensor] | None, grad_accumulation: bool, optimizer: OptimizerSpec | None,
               device_type: str, granularity: int) -> LoopSetup:
    """The loop around ``captured``'s step (``device_type``: where the step runs;
    ``granularity``: the allocator's block size there)."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable taking the model's outputs, not {type(loss_fn).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    held = sum(round_bytes(p.numel() * p.element_size(), granularity) for p in trainable) if grad_accumulation else 0
    state = step = first = 0
    implementation = ""
    if optimizer is not None:
        mem = optimizer_memory(trainable, optimizer, device_type=device_type, granularity=granularity)
        state, step, first, implementation = mem.state_bytes, mem.step_peak_bytes, mem.first_step_peak_bytes, mem.implementation
    loss_points: tuple = ()
    if loss_fn is not None and captured.eager_loss is not None:
        raise ValueError(
            f"{type(model).__name__} computes its own loss (eagerly, after its last graph region, at "
            f"{captured.eager_loss.where}) and loss_fn is given too: leave loss_fn out to train on the model's loss, "
            "or call the model without the inputs that make it compute one (labels) to train on loss_fn's"
        )
    if loss_fn is not None:
        loss_points = _loss_points(model, args, kwargs, loss_fn)
        loss = "loss_fn"
    elif captured.eager_loss is not None:
        loss_points = captured.eager_loss.points
        loss = "model eager"
    elif _returns_loss(captured):
        loss = "model"
    else:
        loss = "output gradients"
        warnings.warn(
            f"{type(model).__name__} returns no one-element output (no loss): the budget counts the gradients of "
            "its outputs that backward starts from, but not the memory of the loss computed from them (what it "
            "saves, its backward); pass loss_fn=<the loss as your loop computes it from the outputs> to plan() "
            "to count it",
            LossNotCountedWarning,
            stacklevel=3,
        )
    loop = TrainingLoop(loss=loss_points, held_grad_bytes=held, optimizer_state_bytes=state, optimizer_step_bytes=step,
                        optimizer_first_step_bytes=first, has_optimizer=optimizer is not None)
    return LoopSetup(loop=loop, loss=loss, grad_accumulation=grad_accumulation,
                     optimizer=optimizer.name if optimizer is not None else "none", implementation=implementation)


def _returns_loss(captured: JointGraph) -> bool:
    """Whether one of the model's outputs is a one-element tensor: its loss, which
    ``backward()`` starts from."""
    out = captured.gm.graph.find_nodes(op="output")[0]
    vals = [a.meta.get("val") for a in out.args[0][: captured.num_fwd_outputs] if isinstance(a, torch.fx.Node)]
    return any(isinstance(v, torch.Tensor) and v.numel() == 1 for v in vals)


def _loss_points(model: torch.nn.Module, args: tuple, kwargs: dict, loss_fn) -> tuple:
    """The loss's points above the level the model's forward leaves
    (:func:`planner.loss_phase.loss_timeline`), on the outputs of one forward
    without grad; a ``loss_fn`` that cannot be captured as a graph (``ctc_loss``:
    its output size depends on the targets) is run eagerly and measured
    (:func:`profiles.eager_loss.measure_loss_fn`), on real outputs only."""
    with state_kept(model), torch.no_grad():
        outputs = _requiring_grad(model(*args, **kwargs))
    try:
        return loss_timeline(profile_graph(capture_loss(loss_fn, outputs))).points
    except CaptureError as e:
        leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        if not leaves or any(t.device.type == "meta" for t in leaves):
            raise CaptureError(
                f"loss_fn could not be captured as a graph ({e}); on real tensors the planner would run it eagerly "
                "and measure it, but the model is on the meta device: build it on the CPU (smaller sizes will do) "
                "or use a traceable loss"
            ) from e
        return measure_loss_fn(loss_fn, outputs, leaves, device=leaves[0].device).points


def _requiring_grad(outputs: Any) -> Any:
    """``outputs`` with every floating-point tensor detached and requiring grad,
    as the model's outputs reach the loss in a training step."""

    def leaf(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().requires_grad_(True)
        return t

    return tree_map(leaf, outputs)
