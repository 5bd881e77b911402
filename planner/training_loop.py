"""The training loop around the planned step, as the simulator and the memory model count it.

The everyday loop is ``out = wrapped(**batch); loss = loss_fn(out); loss.backward();
opt.step(); opt.zero_grad()``, with the caller holding ``out`` until the step ends.
Around the model's compiled forward and backward it adds:

- the loss computed outside the model, between the model's forward and backward
  (:mod:`planner.loss_phase`): its points sit on the level the forward leaves;
- gradients that exist when the step starts (gradient accumulation, a micro-step
  after the first): held all step; backward adds each new gradient into them in
  place after it returns and frees it;
- the optimizer (:mod:`planner.optimizer_memory`): its state is held all step, and
  ``opt.step()`` runs after backward, on the level backward ends at (the outputs
  still held, the gradients), with its temporaries; ``zero_grad()`` allocates nothing.

:class:`TrainingLoop` is what the simulator and the memory model read;
:class:`TrainingLoopInfo` is what a plan records of it (``Plan.training_loop``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainingLoop", "TrainingLoopInfo", "LOSS_SOURCES", "loop_info"]

#: ``TrainingLoopInfo.loss``: how the loss entered the budget.
LOSS_SOURCES = ("loss_fn", "model", "model eager", "output gradients")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingLoop:
    """What the user's training loop adds around the model's forward and backward."""

    #: The loss's points ``(phase, node, bytes above the level forward leaves)``
    #: (``planner.loss_phase.LossPhase.points``); empty when no ``loss_fn`` was given.
    loss: tuple[tuple[str, str, int], ...] = ()
    #: Gradients that exist when the step starts (gradient accumulation), held all step.
    held_grad_bytes: int = 0
    #: Optimizer state, held all step (``OptimizerMemory.state_bytes``).
    optimizer_state_bytes: int = 0
    #: ``opt.step()``'s peak above the level backward ends at, its state resident
    #: (``OptimizerMemory.step_peak_bytes``); 0 with no optimizer.
    optimizer_step_bytes: int = 0
    #: The first ``opt.step()``'s peak above that level, before its state exists
    #: (``OptimizerMemory.first_step_peak_bytes``, the state it allocates included).
    optimizer_first_step_bytes: int = 0
    #: Whether an optimizer step is counted at all.
    has_optimizer: bool = False

    @property
    def held_bytes(self) -> int:
        """Bytes held at every point of forward and backward, whatever the plan."""
        return self.held_grad_bytes + self.optimizer_state_bytes

    def optimizer_peak(self, level_after_backward: int, new_grad_bytes: int) -> int:
        """Bytes live at ``opt.step()``'s peak. ``level_after_backward``: what the
        model's step leaves when backward returns (parameters, buffers, inputs, the
        held outputs, the new gradients; not :attr:`held_bytes`); ``new_grad_bytes``:
        of which the gradients backward made, which under accumulation were added
        into the held ones and freed."""
        base = level_after_backward - (new_grad_bytes if self.held_grad_bytes else 0)
        later = base + self.held_bytes + self.optimizer_step_bytes
        first = base + self.held_grad_bytes + self.optimizer_first_step_bytes
        return max(later, first)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingLoopInfo:
    """What a plan's budget assumed of the training loop (the JSON ``training_loop`` object)."""

    #: How the loss is counted: ``"loss_fn"`` (the ``loss_fn`` given to ``plan()``: its
    #: forward and backward between the model's), ``"model"`` (the model returns a
    #: one-element output, its loss), ``"model eager"`` (the model's loss is computed in
    #: code torch.compile runs eagerly after its last graph region: its forward and
    #: backward measured on the example inputs, :mod:`profiles.eager_loss`) or
    #: ``"output gradients"`` (neither: only the
    #: full-size gradients of the outputs that backward starts from).
    loss: str
    #: Predicted bytes live at the loss's peak (0 unless ``loss`` is ``"loss_fn"`` or ``"model eager"``).
    loss_peak_bytes: int = 0
    #: Whether gradients exist when the step starts (``plan(..., grad_accumulation=True)``).
    grad_accumulation: bool = False
    #: ``"adamw"``, ``"adam"``, ``"sgd"``, or ``"none"`` (``opt.step()`` not in the budget).
    optimizer: str = "none"
    #: The implementation assumed: ``"for-loop"``, ``"foreach"`` or ``"fused"`` ("" without optimizer).
    optimizer_implementation: str = ""
    #: The optimizer's state, held all step.
    optimizer_state_bytes: int = 0
    #: Predicted peak of forward, loss and backward.
    backward_peak_bytes: int = 0
    #: Predicted peak at ``opt.step()`` (0 without optimizer).
    optimizer_step_peak_bytes: int = 0

    def __post_init__(self):
        if self.loss not in LOSS_SOURCES:
            raise ValueError(f"training_loop.loss is {self.loss!r}; expected one of {', '.join(LOSS_SOURCES)}")


def loop_info(timeline, *, loss: str, grad_accumulation: bool, optimizer: str, implementation: str,
              state_bytes: int) -> TrainingLoopInfo:
    """The record of a plan whose predicted ``timeline`` (``(phase, node, bytes)``) was
    simulated with the loop: the peaks of its loss, of forward to backward, and of
    ``opt.step()`` (phase ``"optimizer"``)."""
    loss_points = [b for phase, _, b in timeline if phase.startswith("loss")]
    step = [b for phase, _, b in timeline if phase == "optimizer"]
    return TrainingLoopInfo(
        loss=loss,
        loss_peak_bytes=max(loss_points, default=0),
        grad_accumulation=grad_accumulation,
        optimizer=optimizer,
        optimizer_implementation=implementation,
        optimizer_state_bytes=state_bytes,
        backward_peak_bytes=max((b for phase, _, b in timeline if phase != "optimizer"), default=0),
        optimizer_step_peak_bytes=max(step, default=0),
    )
