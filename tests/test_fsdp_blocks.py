"""Planning for FSDP2 wrapped per block (``fsdp_wrap="blocks"``), without processes.

What FSDP2 holds per rank along the step is checked against 2 gloo ranks in
``tests/dist_blocks.py`` (run by ``tests/test_distributed.py``). Here: the per-node
bytes against the same step planned for one process, by hand; the plan's record
(JSON, schema, summary, CLI); such a plan run by ``runtime.apply`` in one process
(each block compiled on its own), exact with dropout in the blocks, and refusing other
input shapes; and the refusals: the one-graph ``PlannedModule`` of such a plan, a
model without repeated blocks, ``fsdp_wrap="blocks"`` without FSDP2.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import planner
import runtime
from planner.fsdp_blocks import NoBlocksToWrap
from planner.problem import build_problem
from profiles.allocator import granularity
from profiles.capture import capture
from profiles.graph_profile import profile_graph

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from tiny_models import residual_mlp  # noqa: E402

from helpers import ResidualNet, run_step  # noqa: E402

KW = {"world_size": 4, "sharding": "fsdp", "optimizer": "adamw"}


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_per_node_bytes_by_hand():
    """ResidualMLP (4 blocks; d=64, hidden 256; every dim 0 divides by 4): at each point
    the per-rank timeline is the one-process timeline plus what FSDP2 holds there."""
    model, inputs = residual_mlp()
    blocks = planner.plan(model, 1.0, inputs, fsdp_wrap="blocks", **KW)
    assert not blocks.recomputed
    # the one-process step as split, not arranged: per-block FSDP2 runs its graphs as split (each block compiled alone)
    single = build_problem(profile_graph(capture(model, inputs)), granularity=granularity("cpu")).unarranged()
    d = blocks.distributed
    assert (d.fsdp_wrap, d.fsdp_blocks) == ("blocks", tuple(f"blocks.{i}" for i in range(4)))
    n, full = 4, _nbytes(model.parameters())
    blk = _nbytes(model.blocks[0].parameters())  # P = A = G = R of a block; its gradient shard is P / 4
    root = full - 4 * blk
    # all step: the shards, AdamW's two moments per shard and a 4-byte step count per parameter,
    # less every block's unsharded parameters (the one-process step counts them all)
    base = full // n + 2 * full // n + 4 * len(list(model.parameters())) - 4 * blk
    deltas = {}
    for (phase, name, got), (_, name1, one) in zip(blocks.baseline_timeline, single.timeline(frozenset()), strict=True):
        assert name == name1
        deltas.setdefault(phase, []).append(got - one)
    fwd = sorted(set(deltas["forward"]))
    # the root's all-gather output before the blocks; a block's output and parameters while it
    # runs (the one before it too, at its copy-out); the last block's output after them
    assert fwd == [base + root, base + blk, base + 2 * blk]
    bwd = set(deltas["backward"])
    # the first block's backward: its parameters, nothing prefetched, three blocks reduced
    # (gradient shards in place of gradients) and the last one's reduce-scatter input held
    assert base + blk + 3 * (blk // n - blk) + blk in bwd
    # a middle block's: its parameters, the one before prefetched
    assert base + 2 * blk in bwd


def test_plan_record_cli_and_refusals(tmp_path, capsys):
    from runtime.tools.cli import main

    factory = str(ROOT / "examples" / "tiny_models.py") + ":residual_mlp"
    out = tmp_path / "plan.json"
    assert main(["plan", factory, "--budget-gb", "0.01", "--world-size", "4", "--sharding", "fsdp",
                 "--fsdp-wrap", "blocks", "--optimizer", "adamw", "-q", "-o", str(out)]) == 0
    p = planner.Plan.from_json(out)
    assert p.distributed.fsdp_wrap == "blocks" and len(p.distributed.fsdp_blocks) == 4
    assert planner.Plan.from_json(p.to_json()) == p
    import jsonschema

    schema = json.loads((ROOT / "docs" / "plan.schema.json").read_text())
    jsonschema.validate(json.loads(p.to_json()), schema, cls=jsonschema.Draft202012Validator)
    assert "fsdp per block: fully_shard on 4 blocks (blocks.0 .. blocks.3), then the model" in p.summary()
    model, _ = residual_mlp()
    with pytest.raises(ValueError, match=r"fsdp_wrap='blocks'.*not as one graph.*runtime.fully_shard_blocks\(runtime.apply"):
        runtime.PlannedModule(model, p)
    one_group = dataclasses.replace(p, distributed=dataclasses.replace(p.distributed, fsdp_wrap="model", fsdp_blocks=()))
    assert "fsdp_wrap" not in json.loads(one_group.to_json())["distributed"]  # one group: the JSON as before
    with pytest.raises(ValueError, match="not made with fsdp_wrap='blocks'"):
        runtime.fully_shard_blocks(model, one_group)
    capsys.readouterr()
    assert main(["verify", factory, str(out)]) == 2
    assert "cannot verify" in capsys.readouterr().err
    assert main(["plan", factory, "--budget-gb", "0.01", "--world-size", "4", "--sharding", "ddp",
                 "--fsdp-wrap", "blocks", "-q"]) == 2
    assert "it needs sharding='fsdp', not 'ddp'" in capsys.readouterr().err


def test_apply_runs_blocks_compiled_alone():
    """ResidualNet (4 blocks with dropout, an in-place op on each block's output, BatchNorm
    after them), planned per block at 85% of its per-rank peak: ``runtime.apply`` compiles
    each block on its own, split by the plan's decisions on it, and runs the rest eagerly;
    one step in one process (no FSDP2: the graphs are the same) gives eager's loss and
    gradients exactly. The planner recomputes only inside the blocks, never a block's
    output. Inputs of another batch size are refused naming the first node that differs."""
    torch.manual_seed(0)
    base = ResidualNet().train()
    inputs = {"x": torch.randn(256, 64), "target": torch.randint(0, 8, (256,))}
    with planner.prepare(base, inputs, fsdp_wrap="blocks", **KW) as step:
        low = step.plan(int(0.85 * step.plan(1.0 * (1 << 30)).predicted_peak_bytes))
    modules = {d.name: d.module for d in low.nodes}
    recomputed = [n for n in low.recomputed if any(d.name == n and d.bytes for d in low.nodes)]
    assert recomputed and all(modules[n].startswith("blocks.") for n in recomputed), recomputed
    # each block's output (its second Linear) stays saved: the eager code between blocks reads it
    assert not any(modules[n].endswith(".3") for n in recomputed), recomputed
    ref, model = copy.deepcopy(base), copy.deepcopy(base)
    planned = runtime.apply(model, low)
    assert isinstance(planned, runtime.PlannedBlocks)
    _, loss_ref = run_step(ref, inputs, seed=3)
    _, loss = run_step(planned, inputs, seed=3)
    assert torch.equal(loss, loss_ref)
    assert [path for path, _, _ in planned.compiled_graphs] == [f"blocks.{i}" for i in range(4)]
    for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name
    with pytest.raises(runtime.BlockMismatch, match=r"block 'blocks.0' .* forward node #1: 'addmm' .*\(128, 256\)"
                       r".*the plan has 'addmm_1' .*\(256, 256\).*other shapes than planned"):
        run_step(planned, {"x": torch.randn(128, 64), "target": torch.randint(0, 8, (128,))}, seed=3)
    with pytest.raises(runtime.AutocastMismatch, match="made without autocast"), torch.autocast("cpu", torch.bfloat16):
        run_step(planned, inputs, seed=3)
    with pytest.raises(ValueError, match="block 'blocks.0' already runs another forward"):
        runtime.apply(model, low)


def test_apply_runs_blocks_planned_under_autocast():
    """Planned per block under ``torch.autocast("cpu", bfloat16)`` (the blocks' graphs then
    cast): the step under the same autocast gives eager's loss and gradients exactly."""
    torch.manual_seed(0)
    base = ResidualNet().train()
    inputs = {"x": torch.randn(256, 64), "target": torch.randint(0, 8, (256,))}
    with torch.autocast("cpu", torch.bfloat16), planner.prepare(base, inputs, fsdp_wrap="blocks", **KW) as step:
        low = step.plan(int(0.85 * step.plan(1.0 * (1 << 30)).predicted_peak_bytes))
    assert low.model.autocast == "cpu:bfloat16" and low.recomputed
    ref, model = copy.deepcopy(base), copy.deepcopy(base)
    planned = runtime.apply(model, low)
    with torch.autocast("cpu", torch.bfloat16):
        _, loss_ref = run_step(ref, inputs, seed=3)
        _, loss = run_step(planned, inputs, seed=3)
    assert torch.equal(loss, loss_ref)
    for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).sum()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"world_size": 2, "sharding": "ddp"}, ValueError, "needs sharding='fsdp', not 'ddp'"),
    ({"world_size": 2, "sharding": "fsdp", "fsdp_wrap": "layers"}, ValueError, "unknown fsdp_wrap 'layers': choose one of model"),
    ({"world_size": 2, "sharding": "fsdp"}, NoBlocksToWrap, "found no repeated blocks.*fsdp_wrap='model'"),
])
def test_bad_fsdp_wrap(kwargs, error, match):
    kwargs = {"fsdp_wrap": "blocks", **kwargs}
    with pytest.raises(error, match=match):
        planner.plan(_Flat(), 1.0, (torch.randn(8, 16),), **kwargs)
