"""Run a per-block FSDP2 plan (``fsdp_wrap="blocks"``): each block compiled on its own, the code between blocks eager.

As torchtitan trains: each block of ``Plan.distributed.fsdp_blocks`` runs its
forward as a ``torch.compile``-d graph whose AOTAutograd partitioner splits the
block's joint graph by the plan's decisions on that block (mapped by
:mod:`runtime.block_plan`); the embeddings, final norm, head and loss run eagerly,
as the user's model does. FSDP2's hooks (``fully_shard`` on each block, then on
the root: :func:`runtime.fully_shard_blocks`) run around each block's call,
outside its graph.

Blocks of one kind share dynamo's compiled code (one code object, the same
graph), so :class:`BlockBackend` compiles one split per block of a graph and
runs the one of the block being called: each block's ``forward`` is set to a
function that names its block, then calls the compiled forward.
"""

from __future__ import annotations

import torch
from torch import nn

from planner.plan_type import Plan
from profiles._torch_private import aot_autograd, allow_recompiles, copy_graph_module, quiet_graph_breaks
from profiles.capture import prepare_joint
from profiles.causal_sdpa import with_causal_sdpa
from profiles.signature import parameter_mismatch

from .block_plan import BlockMismatch, PlannedNode, block_recompute, planned_blocks
from .distributed import check_wrapping
from .mismatch import check_step_autocast
from .partition import op_by_op, split_joint

__all__ = ["BlockBackend", "PlannedBlocks"]


class BlockBackend:
    """A ``torch.compile`` backend that splits each block's graph by the plan's
    decisions on that block; ``current`` is the index of the block being called."""

    def __init__(self, plan: Plan, planned: dict[str, tuple[PlannedNode, ...]], graphs: list):
        self.plan = plan
        self.paths = plan.distributed.fsdp_blocks
        self.planned = planned
        self.recomputed = frozenset(plan.recomputed)
        self.graphs = graphs
        #: Index into ``paths`` of the block whose forward runs (set before each call).
        self.current: int | None = None
        self.backend = with_causal_sdpa(self._compile)

    def __call__(self, gm, example_inputs):
        return self.backend(gm, example_inputs)

    def _compile(self, gm, example_inputs):
        runs, errors = {}, {}
        for i, path in enumerate(self.paths):
            try:
                runs[i] = aot_autograd(fw_compiler=op_by_op, bw_compiler=op_by_op,
                                       partition_fn=self._partition(path))(copy_graph_module(gm), example_inputs)
            except BlockMismatch as e:
                errors[i] = e

        def run(*args):
            i = self.current
            if i not in runs:
                raise BlockMismatch(str(errors.get(i, f"no block of the plan is being called ({i})")))
            return runs[i](*args)

        if runs and all(getattr(r, "_boxed_call", False) for r in runs.values()):
            run._boxed_call = True
        return run

    def _partition(self, path: str):
        def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
            prepare_joint(joint, dropout=self.plan.dropout, num_fwd_outputs=num_fwd_outputs)
            recompute = block_recompute(path, self.planned[path], joint, self.recomputed)
            fwd, bwd, _ = split_joint(joint, recompute, num_fwd_outputs=num_fwd_outputs)
            self.graphs.append((path, fwd, bwd))
            return fwd, bwd

        return partition


def _block_forward(backend: BlockBackend, index: int, compiled):
    def forward(*args, **kwargs):
        backend.current = index
        with quiet_graph_breaks():  # dynamo's look at the block's input, a non-leaf tensor's .grad, warns
            return compiled(*args, **kwargs)

    return forward


class PlannedBlocks(nn.Module):
    """``model`` trained under a per-block plan: each planned block's forward compiled
    on its own and split by the plan, the rest eager. Shares ``model`` (its blocks'
    ``forward`` are set to the compiled ones). Wrap it with
    :func:`runtime.fully_shard_blocks` (``fully_shard`` on the blocks, then on it)."""

    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        check_wrapping(model)
        plan.check()
        why = parameter_mismatch(model, plan.model.parameters)
        if why:
            raise BlockMismatch(f"this plan was made for another model ({plan.model.class_name or '?'}): {why}; "
                                "plan again with planner.plan(model, budget_gb, inputs, fsdp_wrap='blocks')")
        self.module = model
        self.plan = plan
        #: ``(block path, forward, backward)`` GraphModules of each block compiled, for inspection.
        self.compiled_graphs: list = []
        blocks = [model.get_submodule(path) for path in plan.distributed.fsdp_blocks]
        for path, block in zip(plan.distributed.fsdp_blocks, blocks):
            if "forward" in vars(block):
                raise ValueError(f"block {path!r} already runs another forward (runtime.apply was called on this model "
                                 "before): apply the plan to a fresh model")
        allow_recompiles()
        backend = BlockBackend(plan, planned_blocks(model, plan), self.compiled_graphs)
        for i, block in enumerate(blocks):
            compiled = torch.compile(block.forward, backend=backend, fullgraph=True, dynamic=False)
            block.forward = _block_forward(backend, i, compiled)

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            check_step_autocast(self.plan.model.autocast, self.module, args, kwargs)
        return self.module(*args, **kwargs)
