"""Find the repeated blocks of a profiled step: transformer layers, residual blocks.

A block is the set of joint-graph nodes of one child of a module list (module
paths ``transformer.h.3``, ``stages.0.1``): its forward nodes and the backward
nodes autograd attributes to it. Two blocks are of the same *kind* when their
nodes match one to one in operator, arguments and shapes, with references inside
the block by position and references outside it (the previous block's output, a
shared attention mask) by order of first use: copies of one layer. Blocks of the
same structure at other sizes (a stage of another width) have the same
``structure`` digest but another ``kind``. Kinds with one block are left out:
there is nothing to reuse.

The module list whose repeated blocks cover the most forward nodes is taken
first, then the next that does not overlap it, and so on (a ResNet's stages are
not copies of one another, but the blocks within a stage may be).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from profiles.graph_profile import GraphProfile

__all__ = ["Block", "BlockSet", "find_blocks"]

#: Blocks of one kind needed before it counts as repeated.
MIN_COPIES = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class Block:
    """One copy of a repeated block."""

    #: Module path, e.g. ``transformer.h.3``.
    path: str
    #: Digest of the nodes with their shapes: blocks of one kind are copies.
    kind: str
    #: Digest of the nodes without shapes: the same layer at another size.
    structure: str
    #: The block's forward call_function nodes, in run order (the i-th of two
    #: blocks of one kind correspond).
    forward: tuple[str, ...]
    #: Its backward call_function nodes, in run order.
    backward: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockSet:
    """The repeated blocks of a step."""

    #: Blocks of kinds with at least :data:`MIN_COPIES` copies, in forward order.
    blocks: tuple[Block, ...]
    #: Forward call_function nodes of the whole step.
    num_forward: int

    @property
    def kinds(self) -> dict[str, list[Block]]:
        """Blocks by kind, kinds in order of first appearance."""
        out: dict[str, list[Block]] = {}
        for b in self.blocks:
            out.setdefault(b.kind, []).append(b)
        return out

    @property
    def coverage(self) -> float:
        """Fraction of the step's forward nodes inside a repeated block."""
        return sum(len(b.forward) for b in self.blocks) / max(1, self.num_forward)


def _block_paths(module: str) -> list[str]:
    """Every prefix of ``module`` ending in an index, outermost first
    (``stages.0.1.conv1`` -> ``stages.0``, ``stages.0.1``)."""
    parts = module.split(".") if module else []
    return [".".join(parts[: i + 1]) for i, p in enumerate(parts) if p.isdigit() and i > 0]


def _shape(node: fx.Node, sizes: bool) -> str:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return ";".join(
        (f"{tuple(v.shape)}:{v.dtype}" if sizes else str(v.dtype)) if isinstance(v, torch.Tensor) else type(v).__name__
        for v in vals
    )


class _Encoder:
    """Writes a block's nodes as text with references by position."""

    def __init__(self, gp: GraphProfile, forward: tuple[str, ...], backward: tuple[str, ...], sizes: bool):
        self.gp, self.sizes = gp, sizes
        self.local = {n: f"f{i}" for i, n in enumerate(forward)} | {n: f"b{i}" for i, n in enumerate(backward)}
        self.outside: dict[str, str] = {}

    def ref(self, a: fx.Node) -> str:
        if a.name in self.local:
            return self.local[a.name]
        phase = self.gp.nodes[a.name].phase
        if phase == "primal":
            return f"p[{_shape(a, self.sizes)}]"
        return self.outside.setdefault(a.name, f"x{len(self.outside)}")

    def arg(self, a) -> str:
        if isinstance(a, fx.Node):
            return self.ref(a)
        if isinstance(a, (list, tuple)):
            return "(" + ",".join(self.arg(x) for x in a) + ")"
        if not self.sizes and isinstance(a, int) and not isinstance(a, bool):
            return "i"  # shapes and sizes in arguments: the same structure at another size
        return repr(a)

    def line(self, node: fx.Node) -> str:
        ni = self.gp.nodes[node.name]
        args = ",".join(self.arg(a) for a in node.args)
        kwargs = ",".join(f"{k}={self.arg(v)}" for k, v in sorted(node.kwargs.items()))
        return f"{node.target}({args};{kwargs})->{_shape(node, self.sizes)}|{int(ni.recomputable)}"


def _digest(gp: GraphProfile, by_name, forward, backward, sizes: bool) -> str:
    enc = _Encoder(gp, forward, backward, sizes)
    h = hashlib.sha256()
    for name in (*forward, "|", *backward):
        h.update((enc.line(by_name[name]) if name != "|" else "|").encode() + b"\n")
    return h.hexdigest()[:16]


def _candidates(gp: GraphProfile) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """Per module list path: its children's forward and backward call_function nodes."""
    groups: dict[str, dict[str, tuple[list[str], list[str]]]] = defaultdict(dict)
    for node in gp.gm.graph.nodes:
        if node.op != "call_function":
            continue
        ni = gp.nodes[node.name]
        if ni.phase not in ("forward", "backward"):
            continue
        for path in _block_paths(ni.module):
            parent = path.rsplit(".", 1)[0]
            fwd, bwd = groups[parent].setdefault(path, ([], []))
            (fwd if ni.phase == "forward" else bwd).append(node.name)
    return groups


def find_blocks(gp: GraphProfile) -> BlockSet:
    """The repeated blocks of ``gp``'s step (see the module's docstring)."""
    by_name = {n.name: n for n in gp.gm.graph.nodes}
    options: list[list[Block]] = []
    for parent, children in _candidates(gp).items():
        blocks = []
        for path, (fwd, bwd) in children.items():
            if not fwd:
                continue
            fwd_t, bwd_t = tuple(fwd), tuple(bwd)
            blocks.append(Block(path=path, kind=_digest(gp, by_name, fwd_t, bwd_t, True),
                                structure=_digest(gp, by_name, fwd_t, bwd_t, False), forward=fwd_t, backward=bwd_t))
        count: dict[str, int] = defaultdict(int)
        for b in blocks:
            count[b.kind] += 1
        repeated = [b for b in blocks if count[b.kind] >= MIN_COPIES]
        if repeated:
            options.append(repeated)
    chosen: list[Block] = []
    taken: set[str] = set()
    for group in sorted(options, key=lambda g: (-sum(len(b.forward) for b in g), g[0].path)):
        if any(n in taken for b in group for n in b.forward):
            continue
        chosen += group
        taken.update(n for b in group for n in b.forward)
    order = {n: i for i, n in enumerate(by_name)}
    chosen.sort(key=lambda b: order[b.forward[0]])
    num_forward = sum(1 for ni in gp.nodes.values() if ni.phase == "forward")
    return BlockSet(blocks=tuple(chosen), num_forward=num_forward)
