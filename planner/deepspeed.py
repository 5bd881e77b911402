"""Per-rank memory of a DeepSpeed engine (ZeRO stages 0, 1, 2) around a planned module, per phase of a step.

``deepspeed.initialize(model=runtime.apply(model, plan), ...)`` runs the plan's
step inside DeepSpeed's engine. Beyond the step itself (parameters, activations,
the gradients the compiled backward returns), one rank holds what
:func:`engine_bytes` counts, by phase as :class:`planner.distributed.EngineBytes`
describes them:

- **Stage 0**: the torch optimizer's state (Adam/AdamW: two moments per element, in the
  parameters' dtype, and a step count); with bf16 an fp32 master copy of every
  parameter, whose fp32 moments the optimizer keeps; under gradient accumulation
  the summed gradients (``param.grad``) between micro-steps; at the accumulation
  boundary the all-reduce's flat copy of the gradients (up to 5e8 elements at a time).
- **Stages 1 and 2**: the trainable parameters moved into one flat buffer per
  parameter group (padded to ``2 * world_size`` elements; it replaces the
  parameters, so only the padding is added), this rank's fp32 master partition
  (``1/world_size`` of the flat buffer) and Adam's two fp32 moments of it.
  Gradients go through a ``reduce_bucket_size``-element bucket allocated at the
  first gradient hook; this rank's share of every reduced bucket is copied into a
  gradient partition (the whole of each parameter that overlaps the rank's range).
  Stage 2 reduces at every micro-step and keeps the gradient partition between
  micro-steps; stage 1 keeps the full gradients and the bucket until the boundary.

In a planned module the hooks that reduce gradients run after the compiled
backward returns every gradient at once; their bytes are the ``end`` phase. When
the bucket holds every gradient (DeepSpeed's default of 5e8 elements, for models
below that size) the end phase is exact: the bucket on top of the step's
gradients. A smaller bucket reduces in several rounds whose order follows the
autograd engine's queue; the count is then an upper bound (the gradient
partition allocated before any gradient is freed but the first bucket's).

Measured on CPU (gloo, DeepSpeed 0.19.8) with ``torch.profiler`` allocator
events; ``tests/test_deepspeed.py`` checks it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .deepspeed_config import DeepSpeedSettings, read_config
from .distributed import EngineBytes
from .plan_type import DistributedInfo

__all__ = ["engine_bytes", "rank_engine_bytes", "trainable_groups", "deepspeed_engine", "ALLREDUCE_CHUNK"]

#: Elements the stage-0 engine all-reduces at once (DeepSpeed's ``MEMORY_OPT_ALLREDUCE_SIZE``).
ALLREDUCE_CHUNK = 500_000_000
#: Scalars the engine keeps after an optimizer step beyond the moments (the global gradient norm, ...).
_ENGINE_SCALARS = 8
_ADAM_STEP = 4  # torch.optim.Adam's float32 step count, one per state entry (on the host on CUDA too)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Group:
    """One optimizer parameter group as a ZeRO optimizer lays it out on one rank."""

    #: Elements of each trainable parameter, in flattening order.
    numels: tuple[int, ...]
    #: Elements of the flat buffer (padded to ``2 * world_size``) and of one rank's partition.
    flat: int
    partition: int
    #: Elements of the parameters that overlap this rank's partition (each whole).
    in_partition: int


def trainable_groups(model: torch.nn.Module, settings: DeepSpeedSettings) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters per optimizer group, in the order DeepSpeed flattens them."""
    named = dict(model.named_parameters())
    if settings.param_groups is None:
        return [[p for p in named.values() if p.requires_grad]]
    groups = []
    for names in settings.param_groups:
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"DeepSpeed param_groups name {missing[0]!r}, which is not a parameter of "
                             f"{type(model).__name__} (named_parameters() names it differently?)")
        groups.append([named[n] for n in names if named[n].requires_grad])
    return [g for g in groups if g]


def _layout(numels: list[int], world: int, rank: int) -> _Group:
    """The flat buffer, partition and in-partition elements of one group on ``rank``."""
    align = 2 * world  # DeepSpeed's nccl_start_alignment_factor (2) times the ranks
    flat = math.ceil(sum(numels) / align) * align
    part = flat // world
    lo, hi, start, inside = rank * part, (rank + 1) * part, 0, 0
    for n in numels:
        if start < hi and start + n > lo:
            inside += n
        start += n
    return _Group(numels=tuple(numels), flat=flat, partition=part, in_partition=inside)


def _reduce_end(groups: list[_Group], bucket: int, size: int) -> int:
    """Bytes the gradient hooks add on top of the step's gradients while reducing
    (bucket, flat copies, the gradient partition, minus gradients freed)."""
    numels = [n for g in groups for n in g.numels]
    grads = sum(numels)
    in_part = sum(g.in_partition for g in groups)
    if bucket >= grads:  # one reduction at the end: every gradient is in the bucket first
        return bucket * size
    largest = max(numels)
    if largest > bucket:  # a gradient larger than the bucket is reduced on its own, through a flat copy
        return (bucket + in_part + largest) * size
    return (bucket + max(0, in_part - (bucket - largest))) * size


def _stage0(groups: list[list[torch.nn.Parameter]], settings: DeepSpeedSettings) -> EngineBytes:
    params = [p for g in groups for p in g]
    grads = sum(p.numel() * p.element_size() for p in params)
    # bf16 without ZeRO: an fp32 master copy of every trainable parameter, which the optimizer steps
    master = 4 * sum(p.numel() for p in params) if settings.precision == "bf16" else 0
    opt = 0
    if settings.optimizer == "adamw":
        state = 4 if master else None  # the moments take the stepped parameters' dtype
        opt = sum(2 * p.numel() * (state or p.element_size()) + _ADAM_STEP for p in params) + _ENGINE_SCALARS
    held = grads if settings.accumulation > 1 else 0
    chunk, largest = 0, 0
    for p in params:  # DeepSpeed's allreduce_no_retain: chunks flushed once above the chunk size
        chunk += p.numel() * p.element_size()
        if chunk > ALLREDUCE_CHUNK * p.element_size():
            largest, chunk = max(largest, chunk), 0
    flat_copy = max(largest, chunk)
    static = master + opt
    return EngineBytes(forward=static + held, backward=static + held, end=static + flat_copy, optimizer=opt)


def rank_engine_bytes(model: torch.nn.Module, settings: DeepSpeedSettings, rank: int) -> EngineBytes:
    """What the engine holds on ``rank`` beyond the planned step, per phase (see the module's docstring)."""
    if not 0 <= rank < settings.world_size:
        raise ValueError(f"rank {rank} is not one of the {settings.world_size} ranks")
    params = trainable_groups(model, settings)
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: DeepSpeed has nothing to optimize")
    if settings.stage == 0:
        return _stage0(params, settings)
    size = params[0][0].element_size()
    groups = [_layout([p.numel() for p in g], settings.world_size, rank) for g in params]
    padding = sum(g.flat - sum(g.numels) for g in groups) * size
    master = sum(g.partition for g in groups) * 4
    opt = (sum(2 * g.partition * 4 + _ADAM_STEP for g in groups) + _ENGINE_SCALARS) if settings.optimizer == "adamw" else 0
    static = padding + master + opt
    bucket = settings.reduce_bucket_size if settings.contiguous_gradients else 0
    end = _reduce_end(groups, bucket, size)
    if settings.accumulation == 1:
        return EngineBytes(forward=static, backward=static, end=static + end, optimizer=opt)
    if settings.stage == 2:  # this rank's summed gradient partition between micro-steps
        held = sum(g.in_partition for g in groups) * size
        return EngineBytes(forward=static + held, backward=static + held, end=static + held + end, optimizer=opt)
    # stage 1: every gradient in param.grad and the bucket, from the first micro-step to the boundary;
    # at the boundary the new gradients are added to them and freed, then reduced as in stage 2
    held = sum(sum(g.numels) for g in groups) * size + bucket * size
    return EngineBytes(forward=static + held, backward=static + held, end=static + end, optimizer=opt)


def engine_bytes(model: torch.nn.Module, settings: DeepSpeedSettings) -> EngineBytes:
    """The most any rank holds beyond the planned step, phase by phase (the ranks'
    partitions differ in which parameters they overlap)."""
    ranks = [rank_engine_bytes(model, settings, r) for r in range(settings.world_size)]
    return EngineBytes(
        forward=max(r.forward for r in ranks),
        backward=max(r.backward for r in ranks),
        end=max(r.end for r in ranks),
        optimizer=max(r.optimizer for r in ranks),
    )


def _check_dtype(model: torch.nn.Module, settings: DeepSpeedSettings) -> None:
    """The model is planned in the dtype the engine runs it in (bf16 converts it in ``deepspeed.initialize``)."""
    want = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != want:
            if want == torch.bfloat16:
                raise ValueError(
                    f"the DeepSpeed config enables bf16, which runs the model in bfloat16, but parameter {name!r} is "
                    f"{p.dtype}: plan the model as it will run, model.to(torch.bfloat16) (DeepSpeed keeps the fp32 "
                    "master weights itself), with floating-point inputs in bfloat16 too"
                )
            raise ValueError(f"parameter {name!r} is {p.dtype} but the DeepSpeed config runs in fp32: enable "
                             "\"bf16\" in the config, or plan the model in float32")


def deepspeed_engine(model: torch.nn.Module, config, *, world_size: int = 1, sharding: str = "none",
                     optimizer: str = "none") -> tuple[DistributedInfo, EngineBytes]:
    """``plan(..., deepspeed=config)``: the config's settings for ``model`` (``world_size``
    other than 1 overrides the config's; ``optimizer="adamw"`` counts the caller's own
    optimizer when the config has none), ``Plan.distributed`` and the engine's bytes."""
    if sharding != "none":
        raise ValueError(f"sharding={sharding!r} with a DeepSpeed config: DeepSpeed is the engine; leave sharding out")
    if optimizer not in ("none", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of none, adamw")
    settings = read_config(config, world_size=None if world_size == 1 else world_size)
    if optimizer == "adamw" and settings.optimizer == "none":
        settings = dataclasses.replace(settings, optimizer="adamw")
    _check_dtype(model, settings)
    eb = engine_bytes(model, settings)
    info = DistributedInfo(
        world_size=settings.world_size, sharding="deepspeed", optimizer=settings.optimizer, forward_bytes=eb.forward,
        backward_bytes=eb.backward, end_bytes=eb.end, optimizer_bytes=eb.optimizer, deepspeed=settings.to_dict(),
    )
    return info, eb
