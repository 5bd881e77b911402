"""The data-parallel engine ``plan()`` is asked to plan under: its per-rank bytes and its record in the plan.

``plan(world_size=, sharding=, optimizer=, fsdp_wrap=)`` or ``plan(deepspeed=)`` name an
engine; :func:`engine_setup` checks the options and sizes what the engine holds per
rank (:mod:`planner.distributed`, :mod:`planner.deepspeed`). FSDP2 wrapped per block
(:mod:`planner.fsdp_blocks`) is sized per graph, once the step's repeated blocks are
known: :func:`for_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from profiles.graph_profile import GraphProfile

from .deepspeed import deepspeed_engine
from .distributed import Distributed, EngineBytes, engine_bytes, record
from .fsdp_blocks import ParamSizes, block_bytes, node_bytes, param_sizes
from .loop_capture import check_engine_loop
from .plan_type import DistributedInfo

__all__ = ["EngineSetup", "engine_setup", "for_graph"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineSetup:
    """The engine a plan is made for."""

    #: The data-parallel setup (inactive for one process or DeepSpeed).
    distributed: Distributed
    #: The bytes its engine holds per rank (None: one process).
    engine: EngineBytes | None
    #: ``Plan.distributed`` (None: one process).
    info: DistributedInfo | None
    #: Per-block FSDP2: the model's parameters with their shards, grouped once the step's blocks are known.
    params: tuple[ParamSizes, ...] | None = None


def engine_setup(model: torch.nn.Module, deepspeed: Any, *, world_size: int, sharding: str, optimizer,
                 grad_accumulation: bool, fsdp_wrap: str = "model") -> EngineSetup:
    """The data-parallel setup, the bytes its engine holds per rank and what the plan
    records of it (a DeepSpeed config, or ``world_size``/``sharding``; one process:
    an inactive setup and two ``None``); ``grad_accumulation`` refused where the engine keeps it."""
    check_engine_loop(sharding=sharding, deepspeed=deepspeed, grad_accumulation=grad_accumulation)
    if deepspeed is not None:
        if fsdp_wrap != "model":
            raise ValueError(f"fsdp_wrap={fsdp_wrap!r} is for sharding='fsdp', not for a DeepSpeed engine")
        info, engine = deepspeed_engine(model, deepspeed, world_size=world_size, sharding=sharding, optimizer=optimizer)
        return EngineSetup(distributed=Distributed(), engine=engine, info=info)
    dist_cfg = Distributed(world_size=world_size, sharding=sharding, optimizer=optimizer, fsdp_wrap=fsdp_wrap)
    engine = engine_bytes(model, dist_cfg) if dist_cfg.active else None
    params = param_sizes(model, world_size) if fsdp_wrap == "blocks" else None
    return EngineSetup(distributed=dist_cfg, engine=engine, info=record(dist_cfg, engine) if engine is not None else None,
                       params=params)


def for_graph(setup: EngineSetup, gp: GraphProfile, granularity: int) -> tuple[EngineBytes | None, DistributedInfo | None]:
    """The engine's bytes and record for ``gp``'s step: ``setup``'s own, or per-block
    FSDP2's for the blocks of this graph (:class:`planner.fsdp_blocks.NoBlocksToWrap` when it has none)."""
    if setup.params is None:
        return setup.engine, setup.info
    eb, paths = block_bytes(gp, setup.params, world_size=setup.distributed.world_size,
                            shards=sum(p.shard for p in setup.params), optimizer=setup.engine.optimizer,
                            granularity=granularity)
    phases = {"forward": [], "backward": []}
    for node in gp.gm.graph.nodes:
        phase = gp.nodes[node.name].phase
        if phase in phases:
            phases[phase].append(node.name)
    info = replace(record(setup.distributed, eb), fsdp_blocks=paths,
                   forward_bytes=eb.forward + max(node_bytes(eb.blocks, phases["forward"], "forward"), default=0),
                   backward_bytes=eb.backward + max(node_bytes(eb.blocks, phases["backward"], "backward"), default=0))
    return eb, info
