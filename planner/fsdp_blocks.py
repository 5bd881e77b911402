"""Per-rank bytes of FSDP2 wrapped per block (``fully_shard`` on each repeated block, then the root), along the step.

``plan(..., sharding="fsdp", fsdp_wrap="blocks")`` plans for the torchtitan-style
wrapping: ``fully_shard`` on each repeated block :func:`planner.blocks.find_blocks`
finds (``transformer.h.0``, ``transformer.h.1``, ...), then on the model (the root
group: embeddings, final norm, head). What a rank holds then changes along the
step, so the engine's bytes are per node (:class:`BlockBytes`): the simulator and
the ILP's memory rows add, at each node, what FSDP2 holds there beyond the
simulated single-model step (which counts every parameter unsharded).

Measured on 2 gloo ranks (torch 2.13, CPU, torch.profiler allocator events; a
3-layer GPT-2, ``BENCHMARKS.md``, "Per-block FSDP2 accounting"), per rank, with
``A`` a group's all-gather output (``world_size`` padded shards, one flat buffer),
``P`` its unsharded parameters, ``G`` its unsharded gradients, ``R`` its
reduce-scatter input (``world_size`` padded gradient shards) and ``g`` its
gradient shard:

- all step: every parameter's padded shard and the optimizer's state; the root's
  ``P`` from the root's pre-forward to its post-backward (the root is not
  resharded after forward);
- forward: a block's ``A`` and ``P`` while it runs; its ``P`` is freed after its
  forward, its ``A`` only when the next group's all-gather is copied out (the
  moment of the three, previous ``A``, next ``A`` and next ``P``), the last block's
  when forward returns; the root's ``A`` until the first block's copy-out;
- backward: the root's pre-backward prefetches the last block's ``A`` (gloo's
  all-gather takes a temporary of the same size while it runs); a block's
  pre-backward copies its ``P`` out of its ``A``, frees the ``A`` and prefetches the
  previous block's; after the block's backward its ``P`` is freed, its ``G``
  reduce-scattered through ``R`` into ``g`` (``R`` held until the next group's
  reduce-scatter starts); the root's gradients are reduced last, with ``P`` freed.

Everything else (activations, temporaries, the outputs held) is the simulated step's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from profiles.allocator import round_bytes
from profiles.graph_profile import GraphProfile

from .blocks import find_blocks
from .distributed import EngineBytes, shard_bytes

__all__ = ["GroupBytes", "BlockBytes", "BlockWalk", "ParamSizes", "param_sizes", "block_bytes",
           "NoBlocksToWrap", "node_bytes"]

class NoBlocksToWrap(ValueError):
    """``fsdp_wrap="blocks"`` for a step without repeated blocks to wrap."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamSizes:
    """What FSDP2 shards of one parameter, per rank."""

    #: Parameter name (``model.named_parameters()``, each shared parameter once).
    name: str
    #: Bytes of the unsharded parameter.
    nbytes: int
    #: Bytes of the largest rank's padded shard (dim 0 split in ``world_size`` chunks).
    shard: int
    #: Whether it has a gradient.
    trainable: bool


def param_sizes(model: torch.nn.Module, world_size: int) -> tuple[ParamSizes, ...]:
    """Every parameter of ``model`` (shared ones once) with its FSDP2 shard."""
    return tuple(
        ParamSizes(name=name, nbytes=p.numel() * p.element_size(), shard=shard_bytes(p, world_size),
                   trainable=p.requires_grad)
        for name, p in model.named_parameters()
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupBytes:
    """One FSDP2 parameter group's buffers on one rank."""

    #: The wrapped module's path ("" for the root).
    path: str
    #: ``P``: its parameters unsharded, as the simulated step counts them.
    params: int
    #: ``A``: its all-gather output (every rank's padded shard).
    gathered: int
    #: ``G``: its trainable parameters' unsharded gradients, as the simulated step counts them.
    grads: int
    #: ``R``: its reduce-scatter input (every rank's padded gradient shard).
    reduce_input: int
    #: ``g``: this rank's gradient shard.
    grad_shard: int


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockBytes:
    """Per-node bytes of per-block FSDP2, on top of ``EngineBytes.forward``/``backward``
    (which count the shards, the optimizer and the root's unsharded parameters, and
    take every block's unsharded parameters off the simulated step's)."""

    #: The wrapped blocks, in forward order.
    blocks: tuple[GroupBytes, ...]
    #: The root group (parameters outside every block).
    root: GroupBytes
    #: Joint-graph node -> index into ``blocks`` (forward and backward nodes of the blocks).
    block_of: Mapping[str, int]

    def walk(self, phase: str, nodes) -> "BlockWalk":
        """A walk through one graph's ``nodes``, ``(name, op)`` in run order (``phase``:
        ``"forward"`` or ``"backward"``)."""
        return BlockWalk(self, phase, nodes)


class BlockWalk:
    """Where FSDP2 is while one graph runs: the block in flight, the blocks done.

    :meth:`enter`, called for each node in run order (with its fx op), gives ``(delta, entry)``: the
    bytes FSDP2 adds at that node beyond the phase's constant, and for the node that
    starts a block (or backward) the bytes of the moment just before it (the
    all-gather's copy-out and prefetch), to add to the level before the node, else None.
    A node of a block already done counts as the block in flight's, and so does a
    node outside every block (a residual's gradient sum) while another block node
    follows; after the last block node the root's own nodes run with that block done."""

    __slots__ = ("bb", "backward", "current", "done", "grads", "started", "pos", "last_block_pos")

    def __init__(self, bb: BlockBytes, phase: str, nodes):
        self.bb = bb
        self.backward = phase == "backward"
        #: Position of the next node, and of the graph's last block node.
        self.pos = 0
        self.last_block_pos = max((i for i, (n, op) in enumerate(nodes) if op == "call_function" and n in bb.block_of),
                                  default=-1)
        #: The block in flight, or the last one run (None before the first).
        self.current: int | None = None
        #: Blocks whose forward (backward) has ended, the last one last.
        self.done: list[int] = []
        #: Backward: over the blocks done, their gradient shards less their unsharded gradients.
        self.grads = 0
        #: Whether a node has been entered.
        self.started = False

    def _before(self, i: int) -> int:
        """The all-gather output held with block ``i`` in flight besides its own: in
        forward the group's before it (its own until the copy-out), in backward the
        block before it, prefetched (none for the first block)."""
        if i > 0:
            return self.bb.blocks[i - 1].gathered
        return 0 if self.backward else self.bb.root.gathered

    def _reduced(self, grads: int, last: int | None) -> int:
        """Backward: the reduced blocks' shards less unsharded gradients, and the last one's reduce-scatter input."""
        return 0 if last is None else grads + self.bb.blocks[last].reduce_input

    def enter(self, name: str, op: str = "call_function") -> tuple[int, int | None]:
        blocks, first = self.bb.blocks, not self.started
        self.started = True
        b = self.bb.block_of.get(name) if op == "call_function" else None  # a saved value's placeholder is no block's
        if (b is not None and b in self.done) or (b is None and self.pos < self.last_block_pos):
            b = self.current
        self.pos += 1
        entry = None
        if b is not None and b != self.current:
            if self.current is not None:
                self._finish(self.current)
            self.current = b
            blk = blocks[b]
            if self.backward:
                entry = blk.params + max(blk.gathered, 2 * self._before(b)) + self._reduced(self.grads, self._last())
            else:
                entry = self._before(b) + blk.gathered + blk.params
        cur = self.current
        if not self.backward:
            if cur is None:
                return self.bb.root.gathered, entry
            return blocks[cur].gathered + (blocks[cur].params if b == cur else 0), entry
        if cur is None:  # the root's backward: the last block prefetched (with gloo's temporary at the start)
            last = blocks[-1].gathered
            return last, 2 * last if first else entry
        blk = blocks[cur]
        if b == cur:
            return blk.params + self._before(cur) + self._reduced(self.grads, self._last()), entry
        # a root node after the block's backward: its gradients reduced, the block before it prefetched
        return self._before(cur) + self._reduced(self.grads + blk.grad_shard - blk.grads, cur), entry

    def _last(self) -> int | None:
        return self.done[-1] if self.done else None

    def _finish(self, i: int) -> None:
        self.done.append(i)
        if self.backward:
            self.grads += self.bb.blocks[i].grad_shard - self.bb.blocks[i].grads


def _group(path: str, members: list[ParamSizes], world_size: int, gran: int) -> GroupBytes:
    trainable = [p for p in members if p.trainable]
    grad_shard = sum(p.shard for p in trainable)
    return GroupBytes(
        path=path,
        params=sum(round_bytes(p.nbytes, gran) for p in members),
        gathered=round_bytes(world_size * sum(p.shard for p in members), gran),
        grads=sum(round_bytes(p.nbytes, gran) for p in trainable),
        reduce_input=round_bytes(world_size * grad_shard, gran),
        grad_shard=round_bytes(grad_shard, gran),
    )


def block_bytes(gp: GraphProfile, params: tuple[ParamSizes, ...], *, world_size: int, shards: int,
                optimizer: int, granularity: int = 1) -> tuple[EngineBytes, tuple[str, ...]]:
    """The per-rank bytes of FSDP2 wrapped per block around ``gp``'s step, and the
    wrapped blocks' paths: ``params`` the model's (:func:`param_sizes`), ``shards``
    the bytes of every parameter's padded shard, ``optimizer`` the optimizer's state
    on one rank. :class:`NoBlocksToWrap` when the step has no repeated blocks."""
    found = find_blocks(gp).blocks
    if not found:
        raise NoBlocksToWrap(
            "fsdp_wrap='blocks' found no repeated blocks to wrap in this model (no module list of identical "
            "layers, like transformer.h.*): plan with fsdp_wrap='model' (one fully_shard around the model)"
        )
    members: list[list[ParamSizes]] = [[] for _ in found]
    root: list[ParamSizes] = []
    for p in params:
        i = next((i for i, b in enumerate(found) if p.name.startswith(b.path + ".")), None)
        (root if i is None else members[i]).append(p)
    blocks = tuple(_group(b.path, m, world_size, granularity) for b, m in zip(found, members))
    rg = _group("", root, world_size, granularity)
    base = shards + optimizer - sum(b.params for b in blocks)
    reduced = sum(b.grad_shard - b.grads for b in blocks)
    # the root's post-backward: every parameter resharded, the first block's reduce-scatter
    # input freed once the root's starts, gloo's copy of the root's input while it runs
    root_reduce = max(rg.grads + blocks[0].reduce_input, rg.grads + rg.reduce_input, rg.grad_shard + 2 * rg.reduce_input)
    end = shards + optimizer - rg.params - sum(b.params for b in blocks) + reduced - rg.grads + root_reduce
    bb = BlockBytes(blocks=blocks, root=rg, block_of={n: i for i, b in enumerate(found) for n in (*b.forward, *b.backward)})
    return EngineBytes(forward=base, backward=base, end=end, optimizer=optimizer, blocks=bb), tuple(b.path for b in found)


def node_bytes(bb: BlockBytes, names, phase: str) -> list[int]:
    """For each call_function node of ``names`` (one graph in run order), the most FSDP2 adds there
    beyond the phase's constant: the node's delta, or the moment before it when higher
    (the ILP's rows, which have one point per node)."""
    walk = bb.walk(phase, [(n, "call_function") for n in names])
    out = []
    for name in names:
        delta, entry = walk.enter(name)
        out.append(delta if entry is None else max(delta, entry))
    return out
