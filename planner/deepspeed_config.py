"""Read a DeepSpeed config (a JSON path or a dict) into what the planner needs: :class:`DeepSpeedSettings`.

Only the settings whose per-rank memory :mod:`planner.deepspeed` models are
accepted: ZeRO stages 0, 1 and 2 without offload, fp32 or bf16, Adam/AdamW or
the caller's own optimizer. Anything else raises ``ValueError`` naming the key
and what to use instead, so a plan is never made for an engine it does not describe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["DeepSpeedSettings", "read_config", "ZERO3_REFUSED", "DEFAULT_BUCKET"]

#: DeepSpeed's default ``reduce_bucket_size`` and ``allgather_bucket_size`` (elements).
DEFAULT_BUCKET = 500_000_000

ZERO3_REFUSED = (
    "ZeRO stage 3 is not supported: it gathers each module's parameters with forward and "
    "backward hooks on every submodule, which cannot run inside the one compiled graph a plan "
    "runs as. Use ZeRO stage 2 (\"zero_optimization\": {\"stage\": 2}: optimizer state and "
    "gradients partitioned, parameters whole on every rank), or shard the parameters with FSDP2: "
    "fully_shard(runtime.apply(model, plan)) with plan(..., sharding=\"fsdp\")"
)

_OPTIMIZERS = {"adam": "adamw", "adamw": "adamw"}  # the state both keep: two moments per element, and a step


@dataclass(frozen=True, kw_only=True, slots=True)
class DeepSpeedSettings:
    """What one rank of a DeepSpeed engine holds depends on: read from its config."""

    #: Data-parallel processes (ranks).
    world_size: int
    #: ZeRO stage: 0 (no partitioning), 1 (optimizer state partitioned) or 2 (and gradients).
    stage: int
    #: Samples per rank per forward (``train_micro_batch_size_per_gpu``).
    micro_batch: int
    #: Micro-batches whose gradients are summed before each optimizer step (``gradient_accumulation_steps``).
    accumulation: int
    #: ``"adamw"`` (the config's Adam or AdamW: two moments per element and a step) or ``"none"``
    #: (no ``optimizer`` section: the caller's optimizer, counted only when ``plan(optimizer=...)`` says so).
    optimizer: str
    #: ``"fp32"`` or ``"bf16"``: the dtype the engine runs the model in.
    precision: str
    #: ``zero_optimization.reduce_bucket_size``: elements of the gradient bucket (stages 1 and 2).
    reduce_bucket_size: int = DEFAULT_BUCKET
    #: ``zero_optimization.allgather_bucket_size``: elements gathered at once after a step (stages 1 and 2).
    allgather_bucket_size: int = DEFAULT_BUCKET
    #: ``zero_optimization.contiguous_gradients``: gradients copied into one bucket buffer (stages 1 and 2).
    contiguous_gradients: bool = True
    #: Names of the trainable parameters in each optimizer parameter group, in order, as
    #: DeepSpeed flattens them (None: one group of every trainable parameter in
    #: ``model.named_parameters()`` order, what ``model_parameters=model.parameters()`` gives).
    param_groups: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self):
        for name in ("world_size", "micro_batch", "accumulation", "reduce_bucket_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DeepSpeed {name} must be a whole number >= 1, not {v!r}")
        if self.stage not in (0, 1, 2):
            raise ValueError(ZERO3_REFUSED if self.stage == 3 else f"unknown ZeRO stage {self.stage!r}: use 0, 1 or 2")
        if self.optimizer not in ("adamw", "none"):
            raise ValueError(f"optimizer {self.optimizer!r}: the DeepSpeed settings know 'adamw' and 'none'")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r}: the DeepSpeed settings know 'fp32' and 'bf16'")
        if self.param_groups is not None:
            object.__setattr__(self, "param_groups", tuple(tuple(g) for g in self.param_groups))

    def to_dict(self) -> dict:
        """JSON form (``DistributedInfo.deepspeed``); ``param_groups`` as lists or None."""
        d = asdict(self)
        if self.param_groups is not None:
            d["param_groups"] = [list(g) for g in self.param_groups]
        return d


def _load(config: str | Path | Mapping) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, (str, Path)):
        raise TypeError(f"deepspeed must be a DeepSpeed config: a JSON file path or a dict, not {type(config).__name__}")
    path = Path(config)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read DeepSpeed config {str(path)!r}: {e.strerror or e}") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {str(path)!r} is not JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"DeepSpeed config {str(path)!r} must hold a JSON object, not {type(d).__name__}")
    return d


def _number(d: Mapping, key: str, where: str, default: Any = None) -> Any:
    """``d[key]`` as a whole number (DeepSpeed accepts 5e8 for 500000000); ``default`` when absent."""
    if key not in d or d[key] is None:
        return default
    v = d[key]
    if v == "auto":
        raise ValueError(
            f"DeepSpeed config {where}{key} is \"auto\": the Hugging Face Trainer fills it in; give a number "
            "here, or plan through runtime.tools.trainer (which reads the Trainer's filled-in config)"
        )
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 0:
        raise ValueError(f"DeepSpeed config {where}{key} must be a whole number, not {v!r}")
    return int(v)


def _dist_world() -> int | None:
    """The initialized default process group's size (None outside one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


def _batch(d: Mapping, world_size: int | None) -> tuple[int, int, int]:
    """``(world_size, micro_batch, accumulation)`` as DeepSpeed derives them from the three batch keys."""
    tbs, micro, acc = (_number(d, k, "") for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                  "gradient_accumulation_steps"))
    if world_size is None and None in (tbs, micro, acc) and _dist_world() is not None:
        world_size = _dist_world()
    if world_size is None:
        if None in (tbs, micro, acc):
            raise ValueError(
                "the DeepSpeed config does not fix the number of ranks (it needs train_batch_size, "
                "train_micro_batch_size_per_gpu and gradient_accumulation_steps all three): give "
                "world_size=N (CLI --world-size N), or plan inside the initialized process group (its size counts)"
            )
        if micro * acc == 0 or tbs % (micro * acc):
            raise ValueError(f"DeepSpeed config: train_batch_size {tbs} is not a multiple of "
                             f"train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps {acc}")
        world_size = tbs // (micro * acc)
    if micro is None and acc is None and tbs is None:
        raise ValueError("the DeepSpeed config needs train_batch_size or train_micro_batch_size_per_gpu")
    if micro is None:
        micro = (tbs or 0) // world_size // (acc or 1)
    if acc is None:
        acc = (tbs // micro // world_size) if (tbs is not None and micro) else 1
    if tbs is not None and tbs != micro * acc * world_size:
        raise ValueError(
            f"DeepSpeed config: train_batch_size {tbs} != train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {acc} x {world_size} ranks; DeepSpeed refuses it too"
        )
    return world_size, micro, acc


def _precision(d: Mapping) -> str:
    def enabled(key: str) -> bool:
        section = d.get(key) or {}
        on = section.get("enabled", False) if isinstance(section, Mapping) else False
        if on == "auto":
            raise ValueError(f"DeepSpeed config {key}.enabled is \"auto\": the Hugging Face Trainer fills it in; "
                             "give true or false here, or plan through runtime.tools.trainer")
        return bool(on)

    if enabled("fp16"):
        raise ValueError("DeepSpeed fp16 (loss-scaled float16) is not modelled: use \"bf16\": {\"enabled\": true}, or fp32")
    bf16 = enabled("bf16") or enabled("bfloat16")
    types = d.get("data_types") or {}
    accum = types.get("grad_accum_dtype") if isinstance(types, Mapping) else None
    if accum is not None and accum != ("bf16" if bf16 else "fp32"):
        raise ValueError(f"DeepSpeed config data_types.grad_accum_dtype {accum!r} differs from the model's dtype: "
                         "not modelled (DeepSpeed then keeps another gradient copy); leave it out")
    if d.get("communication_data_type") not in (None, "bf16" if bf16 else "fp32"):
        raise ValueError(f"DeepSpeed config communication_data_type {d['communication_data_type']!r} differs from "
                         "the model's dtype: not modelled (another copy of each bucket); leave it out")
    return "bf16" if bf16 else "fp32"


def _optimizer(d: Mapping) -> str:
    section = d.get("optimizer")
    if section is None:
        return "none"
    kind = str(section.get("type", "")).lower() if isinstance(section, Mapping) else ""
    if kind not in _OPTIMIZERS:
        raise ValueError(
            f"DeepSpeed optimizer {section.get('type') if isinstance(section, Mapping) else section!r} is not modelled: "
            "use \"Adam\" or \"AdamW\", or leave the optimizer section out and pass your own optimizer to "
            "deepspeed.initialize (and plan(..., optimizer=\"adamw\") to count AdamW's state)"
        )
    return _OPTIMIZERS[kind]


def _zero(d: Mapping) -> dict:
    zero = d.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        raise ValueError(f"DeepSpeed config zero_optimization must be an object, not {zero!r}")
    stage = _number(zero, "stage", "zero_optimization.", 0)
    if stage == 3:
        raise ValueError(ZERO3_REFUSED)
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key) or {}, Mapping) else zero.get(key)
        if device not in (None, "none"):
            raise ValueError(f"DeepSpeed config zero_optimization.{key} to {device!r} is not modelled: leave it out")
    for key, default in (("overlap_comm", False), ("reduce_scatter", True), ("round_robin_gradients", False),
                         ("use_multi_rank_bucket_allreduce", True)):
        if key in zero and bool(zero[key]) != default:
            raise ValueError(f"DeepSpeed config zero_optimization.{key}={zero[key]!r} is not modelled: "
                             f"leave it out (DeepSpeed's default for stages 1 and 2 is {default})")
    return {
        "stage": stage,
        "reduce_bucket_size": _number(zero, "reduce_bucket_size", "zero_optimization.", DEFAULT_BUCKET),
        "allgather_bucket_size": _number(zero, "allgather_bucket_size", "zero_optimization.", DEFAULT_BUCKET),
        "contiguous_gradients": bool(zero.get("contiguous_gradients", True)),
    }


def read_config(config: str | Path | Mapping | DeepSpeedSettings, *, world_size: int | None = None,
                param_groups=None) -> DeepSpeedSettings:
    """The :class:`DeepSpeedSettings` of a DeepSpeed config (a JSON path or a dict).

    ``world_size``: the number of ranks; default: the config's
    ``train_batch_size / (train_micro_batch_size_per_gpu * gradient_accumulation_steps)``, or
    when the config leaves it open, the initialized process group's size.
    ``param_groups``: parameter names per optimizer group (see :class:`DeepSpeedSettings`).
    Settings already read are returned as they are (with ``world_size`` checked)."""
    if isinstance(config, DeepSpeedSettings):
        if world_size is not None and world_size != config.world_size:
            raise ValueError(f"world_size={world_size} but the DeepSpeed settings are for {config.world_size} ranks")
        return config
    d = _load(config)
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        raise ValueError(f"world_size must be a whole number of processes >= 1, not {world_size!r}")
    zero = _zero(d)  # ZeRO-3 is refused before anything else
    precision = _precision(d)
    ws, micro, acc = _batch(d, world_size)
    return DeepSpeedSettings(world_size=ws, micro_batch=micro, accumulation=acc, optimizer=_optimizer(d),
                             precision=precision, param_groups=param_groups, **zero)
