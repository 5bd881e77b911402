"""Per-rank memory of a data-parallel engine (DDP, FSDP2) and the optimizer, on top of a planned step.

A plan's simulation counts one model's step: its parameters, buffers, inputs,
activations and gradients, once. Under ``torch.distributed`` each rank also holds
what the engine keeps (DDP's gradient buckets; FSDP2's parameter shards, its
all-gather buffer during forward, its reduce-scatter buffers after backward) and,
optionally, the optimizer's state. :func:`engine_bytes` says how many bytes that
is per rank in each phase of the step; the simulator and the ILP's memory rows add
them to the phase they belong to (``planner.simulate``, ``planner.problem``), so a
per-rank plan is solved and checked against the whole per-rank budget. Measured on CPU (gloo, torch 2.13) with
``torch.profiler`` allocator events; ``tests/test_distributed.py`` checks it.
FSDP2 wrapped per block (``fsdp_wrap="blocks"``) holds bytes that vary node by node:
:mod:`planner.fsdp_blocks` sizes them (``EngineBytes.blocks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .plan_type import DistributedInfo

__all__ = ["Distributed", "EngineBytes", "SHARDINGS", "OPTIMIZERS", "FSDP_WRAPS", "engine_bytes", "record", "from_record", "shard_bytes"]

SHARDINGS = ("none", "ddp", "fsdp")
OPTIMIZERS = ("none", "adamw")
#: ``plan(fsdp_wrap=)``: ``"model"`` (one ``fully_shard`` around the planned module) or
#: ``"blocks"`` (``fully_shard`` on each repeated block, then on the model: :mod:`planner.fsdp_blocks`).
FSDP_WRAPS = ("model", "blocks")


@dataclass(frozen=True, kw_only=True, slots=True)
class Distributed:
    """How the planned module is trained: how many processes, which engine, which optimizer."""

    #: Number of processes (ranks) training together; 1 for a single process.
    world_size: int = 1
    #: ``"none"`` (one process, or the caller counts the engine itself),
    #: ``"ddp"`` (``DistributedDataParallel(runtime.apply(model, plan))``) or
    #: ``"fsdp"`` (``fully_shard(runtime.apply(model, plan))``, FSDP2, one parameter group; per block
    #: with ``fsdp_wrap="blocks"``).
    sharding: str = "none"
    #: ``"none"`` or ``"adamw"``: count ``torch.optim.AdamW``'s state (two moments per
    #: trainable parameter, sharded like the parameters under FSDP), live for the whole step.
    optimizer: str = "none"
    #: Under ``"fsdp"``: ``"model"`` (one ``fully_shard`` around the planned module) or
    #: ``"blocks"`` (``fully_shard`` on each repeated block, then on the model: :mod:`planner.fsdp_blocks`).
    fsdp_wrap: str = "model"

    def __post_init__(self):
        ws = self.world_size
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 1:
            raise ValueError(f"world_size must be a whole number of processes >= 1, not {ws!r}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {self.sharding!r}: choose one of {', '.join(SHARDINGS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.fsdp_wrap not in FSDP_WRAPS:
            raise ValueError(f"unknown fsdp_wrap {self.fsdp_wrap!r}: choose one of {', '.join(FSDP_WRAPS)}")
        if self.fsdp_wrap == "blocks" and self.sharding != "fsdp":
            raise ValueError(f"fsdp_wrap='blocks' wraps FSDP2 per block: it needs sharding='fsdp', not {self.sharding!r}")
        if ws > 1 and self.sharding == "none":
            raise ValueError(
                f"world_size={ws} needs sharding='ddp' or sharding='fsdp' (how the engine holds the model on one rank)"
            )

    @property
    def active(self) -> bool:
        """Whether anything is counted beyond the single-process step."""
        return self.sharding != "none" or self.optimizer != "none"


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineBytes:
    """Bytes one rank holds beyond the plan's simulated step, per phase of the step."""

    #: Added to every point of forward (engine state, optimizer state, FSDP2's all-gather output).
    forward: int
    #: Added to every point of backward.
    backward: int
    #: Added to the simulated level at the end of backward while gradients are reduced
    #: (FSDP2: reduce-scatter input and output, with the unsharded parameters freed).
    end: int
    #: Of these, the optimizer's state (included in all three).
    optimizer: int
    #: Per-block FSDP2 (``fsdp_wrap="blocks"``): the bytes that vary along the step, added at
    #: each node on top of ``forward``/``backward`` (a :class:`planner.fsdp_blocks.BlockBytes`); None otherwise.
    blocks: object | None = None
    #: Inductor's channels-last copies of a graph that convolves on the CPU, added at each node
    #: as they live (a :class:`planner.layout_copies.LayoutCopies`); None otherwise. With them the
    #: step is simulated as Inductor runs it (:mod:`planner.inductor_fusion`).
    layout: object | None = None

    @property
    def held(self) -> int:
        """The most the engine adds during forward or backward."""
        return max(self.forward, self.backward)


def shard_bytes(p: torch.Tensor, n: int) -> int:
    """Bytes of the largest rank's FSDP2 shard of ``p``: dim 0 split in ``n`` padded chunks."""
    if p.dim() == 0:
        return p.element_size()
    rows = math.ceil(p.shape[0] / n)
    return rows * (p.numel() // max(p.shape[0], 1)) * p.element_size()


def engine_bytes(model: torch.nn.Module, cfg: Distributed) -> EngineBytes:
    """Bytes per rank that ``cfg``'s engine and optimizer hold on top of ``model``'s planned step.

    DDP (``gradient_as_bucket_view`` either way): its reducer's buckets, one flat
    copy of the trainable parameters' gradients, allocated when DDP is built.
    FSDP2 with one parameter group (``fully_shard`` on the planned module only): the
    padded parameter shards all step long; during forward also the all-gather
    output (all parameters, padded), which the root keeps until forward ends; after
    backward the unsharded parameters are freed and the gradients reduce-scattered
    through a padded flat input and a sharded output. AdamW: two moments per
    trainable parameter (per shard under FSDP2) and, on CPU, a 4-byte step count.
    """
    n = cfg.world_size
    params = list(model.parameters())  # each shared parameter once
    trainable = [p for p in params if p.requires_grad]
    full = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    if cfg.sharding == "fsdp":
        shards = sum(shard_bytes(p, n) for p in params)
        grad_shards = sum(shard_bytes(p, n) for p in trainable)
        gathered = n * shards  # the all-gather output: every rank's padded shard
        grads_padded = n * grad_shards
    if cfg.optimizer == "adamw":
        per_param = (lambda p: shard_bytes(p, n)) if cfg.sharding == "fsdp" else (lambda p: p.numel() * p.element_size())
        step_bytes = sum(4 for p in trainable if p.device.type == "cpu")  # CUDA keeps `step` on the host
        opt = sum(2 * per_param(p) for p in trainable) + step_bytes
    else:
        opt = 0
    if cfg.sharding == "ddp":
        return EngineBytes(forward=grads + opt, backward=grads + opt, end=grads + opt, optimizer=opt)
    if cfg.sharding == "fsdp":
        return EngineBytes(
            forward=shards + gathered + opt,
            backward=shards + opt,
            end=shards - full + grads_padded + grad_shards + opt,
            optimizer=opt,
        )
    return EngineBytes(forward=opt, backward=opt, end=opt, optimizer=opt)


def record(cfg: Distributed, eb: EngineBytes) -> DistributedInfo:
    """``Plan.distributed``: how the plan's step is trained and what the engine adds per rank."""
    return DistributedInfo(
        world_size=cfg.world_size,
        sharding=cfg.sharding,
        optimizer=cfg.optimizer,
        fsdp_wrap=cfg.fsdp_wrap,
        forward_bytes=eb.forward,
        backward_bytes=eb.backward,
        end_bytes=eb.end,
        optimizer_bytes=eb.optimizer,
    )


def from_record(distributed: DistributedInfo | None) -> EngineBytes | None:
    """The engine's bytes a plan was made with (None for a one-process plan)."""
    if distributed is None:
        return None
    if distributed.fsdp_wrap == "blocks":
        raise ValueError(
            "a plan made with fsdp_wrap='blocks' has per-block FSDP2 bytes that vary along the step, which "
            "depend on the graph: re-plan the model (planner.plan(..., fsdp_wrap='blocks')) to simulate it"
        )
    return EngineBytes(
        forward=int(distributed.forward_bytes),
        backward=int(distributed.backward_bytes),
        end=int(distributed.end_bytes),
        optimizer=int(distributed.optimizer_bytes),
    )
