"""Planned modules under torch.distributed: DDP and FSDP2, 2 gloo processes on loopback.

Each test plans in this process with ``world_size=2`` and the engine's sharding
(AdamW state included), then spawns 2 ranks. Every rank trains the same model
twice with the same seed and its own data: wrapped without a plan (the reference)
and wrapped around ``runtime.apply(model, plan)``; gradients must be equal at two
steps (the second after an AdamW step, DDP's bucket rebuild and FSDP's reshard).
The planned rank's second step is measured from torch.profiler allocator events
covering everything the rank allocated since the model was copied: its per-rank
peak must be within the budget and within 5% of the plan's per-rank prediction
(measured: within 500 bytes of it, on 2.9-3.3 MB). The DDP ranks also train a small
GPT-2 with the loss computed outside the model, planned with ``loss_fn`` and
``grad_accumulation=True``, over ``no_sync()`` micro-steps (measured: within 40
bytes of the prediction, on 2.1 MB), and a model that breaks the graph, planned as
regions, under DDP and FSDP2 (``tests/dist_regions.py``). The FSDP2 ranks also train
a plan compiled by Inductor, under DDP and under FSDP2 (``tests/dist_inductor.py``), and
a GPT-2 wrapped per block, eager and under ``runtime.apply`` of a plan made with ``fsdp_wrap="blocks"``
(each block compiled on its own: ``tests/dist_blocks.py``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import planner
import runtime
from helpers import ResidualNet
from planner.distributed import Distributed, engine_bytes
from profiles import storage_bytes
from profiles.allocator import SAFETY
from profiles.memory import allocator_peak, measure_peak

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)

import dist_blocks  # noqa: E402
import dist_inductor  # noqa: E402
import dist_regions  # noqa: E402
from dist_harness import WORLD, assert_same_grads, init, local_grads, spawn, train, train_against_eager, wrap  # noqa: E402


def _model():
    torch.manual_seed(0)
    return ResidualNet(d=64, blocks=4, hidden=256, p=0.1).train()


def _inputs(rank: int):
    g = torch.Generator().manual_seed(1 + rank)
    return {"x": torch.randn(128, 64, generator=g), "target": torch.randint(0, 8, (128,), generator=g)}


def _worker(rank: int, port: int, plan_json: str, sharding: str, out_dir: str, gpt2: tuple | None,
            inductor: dict | None, regions: dict | None, blocks: list[str] | None) -> None:
    init(rank, port)
    try:
        plan = planner.Plan.from_json(plan_json)
        base = _model()
        inputs = _inputs(rank)
        run = train_against_eager(base, inputs, sharding, lambda m: runtime.apply(m, plan), f"rank {rank}",
                                  region="measured_step")
        ref = run.reference
        result = {"measured": run.measured, "missed_frees": run.missed_frees}
        if sharding == "ddp":
            with pytest.raises(TypeError, match="the model itself is wrapped by DistributedDataParallel"):
                runtime.apply(wrap(copy.deepcopy(base), sharding), plan)
            result["ddp_inside_refused"] = True
        if sharding == "fsdp":
            # fully_shard on the model first, the plan applied to it, also works
            inner_model = copy.deepcopy(base)
            wrap(inner_model, sharding)
            inner = train(runtime.apply(inner_model, plan), inner_model, inputs)
            assert_same_grads(ref[0], inner[0], f"rank {rank} fully_shard(model) then apply, step 1")
            assert_same_grads(ref[1], inner[1], f"rank {rank} fully_shard(model) then apply, step 2")
            result["inner_order"] = True
        if gpt2 is not None:
            result["gpt2"] = _gpt2_accumulation(rank, *gpt2)
        if inductor is not None:
            result["inductor"] = dist_inductor.on_rank(rank, inductor)
        if regions is not None:
            result["regions"] = dist_regions.on_rank(rank, regions)
        if blocks is not None:
            result["blocks"] = dist_blocks.on_rank(rank, blocks)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single():
    """The model and its single-process step, captured once (``planner.prepare``: the
    plans ``planner.plan(model, ..., _inputs(0))`` makes)."""
    model = _model()
    with planner.prepare(model, _inputs(0)) as step:
        yield model, step


@pytest.mark.parametrize("sharding, fraction", [("ddp", 0.75), ("fsdp", 0.64)])
def test_planned_module_trains_under_engine_within_budget(single, sharding, fraction, tmp_path):
    model, step = single
    baseline = step.plan(planner.GiB).baseline_peak_bytes
    engine = engine_bytes(model, Distributed(world_size=WORLD, sharding=sharding, optimizer="adamw"))
    budget = engine.held + int(fraction * baseline)  # leaves the step this fraction of what it needs without a plan
    p = planner.plan(model, budget / planner.GiB, _inputs(0), world_size=WORLD, sharding=sharding, optimizer="adamw")
    assert p.recomputed, "the budget should force recomputation"
    if sharding == "fsdp":
        # FSDP2 holds its all-gather output in forward only: the solver sees each
        # phase's engine bytes. Taking the larger phase's off the whole step leaves
        # no plan at this budget.
        assert engine.forward > engine.backward
        with pytest.raises(planner.BudgetTooSmall):
            step.plan(budget - engine.held)
    assert p.predicted_peak_bytes <= p.budget_bytes == budget
    assert p.distributed == planner.DistributedInfo(
        world_size=WORLD, sharding=sharding, optimizer="adamw", forward_bytes=engine.forward,
        backward_bytes=engine.backward, end_bytes=engine.end, optimizer_bytes=engine.optimizer,
    )
    # in the same ranks (one spawn): the DDP ranks also train a GPT-2 with accumulation, the
    # FSDP2 ranks a plan compiled by Inductor under both engines (tests/dist_inductor.py)
    gpt2 = _gpt2_plan() if sharding == "ddp" else None
    inductor = dist_inductor.plans() if sharding == "fsdp" else None
    regions = dist_regions.plans() if sharding == "ddp" else None
    # the FSDP2 ranks also train a GPT-2 wrapped per block, eager and planned with fsdp_wrap="blocks" (tests/dist_blocks.py)
    blocks_step, *blocks = dist_blocks.prepare() if sharding == "fsdp" else (contextlib.nullcontext(), None)
    blocks = blocks if blocks[0] is not None else None
    with blocks_step, pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")  # the ranks read Inductor's caches: no pool of compile workers
        spawn(_worker, p.to_json(), sharding, str(tmp_path), (gpt2.to_json(), _gpt2_expected_grads()) if gpt2 else None,
              {s: q.to_json() for s, q in inductor.items()} if inductor else None,
              {s: q.to_json() for s, q in regions.items()} if regions else None,
              [q.to_json() for q in blocks] if blocks else None)
        if blocks is not None:
            dist_blocks.check([json.loads((tmp_path / f"rank{r}.json").read_text())["blocks"] for r in range(WORLD)],
                              *blocks)
    for rank in range(WORLD):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        measured = r["measured"]
        assert measured <= p.budget_bytes, f"rank {rank}: measured {measured} > budget {p.budget_bytes} ({r})"
        assert abs(measured - p.predicted_peak_bytes) <= 0.05 * measured, (rank, r, p.predicted_peak_bytes)
        assert r["inner_order"] if sharding == "fsdp" else r["ddp_inside_refused"]
        if gpt2 is not None:
            # every micro-step within the budget; the accumulating one (the highest) as predicted
            assert max(r["gpt2"].values()) <= gpt2.budget_bytes, (rank, r["gpt2"], gpt2.budget_bytes)
            accumulating = r["gpt2"]["accumulating_micro_step"]
            assert abs(accumulating - gpt2.predicted_peak_bytes) <= 0.05 * accumulating, (rank, r["gpt2"], gpt2.predicted_peak_bytes)
        if inductor is not None:
            dist_inductor.check(rank, r["inductor"], inductor)
        if regions is not None:
            dist_regions.check(rank, r["regions"], regions)


def _gpt2():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=256, n_positions=64, use_cache=False,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, lambda out: F.cross_entropy(out.logits.float().flatten(0, 1), ids.flatten())


def _micro_step(module, inputs, loss_fn, seed: int) -> None:
    torch.manual_seed(seed)
    out = module(**inputs)  # held until backward ends, as the everyday loop does
    loss_fn(out).backward()


def _accumulate(ddp, model, inputs, loss_fn):
    """A compiling micro-step, then two accumulated ones (``no_sync()``, then synced),
    each wrapped in record_function; the gradients."""
    from torch.profiler import record_function

    with ddp.no_sync():
        _micro_step(ddp, inputs, loss_fn, seed=10)
    model.zero_grad(set_to_none=True)
    gc.collect()  # the compilation leaves cyclic garbage behind
    for seed, region, ctx in ((11, "first_micro_step", ddp.no_sync), (12, "accumulating_micro_step", contextlib.nullcontext)):
        with ctx(), record_function(region):
            _micro_step(ddp, inputs, loss_fn, seed)
    return local_grads(model)


def _rank_batch(inputs: dict, rank: int) -> dict:
    return {"input_ids": (inputs["input_ids"] + rank) % 256}  # each rank its own batch


def _gpt2_expected_grads() -> dict:
    """What DDP leaves after two accumulated micro-steps on each rank's batch: the mean
    over the ranks of each rank's summed gradients, computed eagerly in this process."""
    base, inputs, loss_fn = _gpt2()
    expected = {}
    for rank in range(WORLD):
        model = copy.deepcopy(base)
        for seed in (11, 12):
            _micro_step(model, _rank_batch(inputs, rank), loss_fn, seed)
        for name, p in model.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad / WORLD
    return expected


def _gpt2_accumulation(rank: int, plan_json: str, expected: dict) -> dict:
    """On one rank: the planned GPT-2's accumulated gradients under DDP are ``expected``;
    the absolute peaks of its two measured micro-steps."""
    from torch.profiler import ProfilerActivity, profile

    plan = planner.Plan.from_json(plan_json)
    base, inputs, loss_fn = _gpt2()
    inputs = _rank_batch(inputs, rank)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = copy.deepcopy(base)
        got = _accumulate(wrap(runtime.apply(model, plan), "ddp"), model, inputs, loss_fn)
        assert_same_grads(expected, got, f"GPT-2, rank {rank}, after accumulating")
        del model, got
        gc.collect()
    return {r: storage_bytes(inputs.values()) + allocator_peak(prof, region=r)[0]
            for r in ("first_micro_step", "accumulating_micro_step")}


def _gpt2_plan() -> planner.Plan:
    """The GPT-2 planned per rank under DDP with ``loss_fn`` and ``grad_accumulation``, at
    85% of the way from what is held all step (parameters, input, DDP's buckets, the
    accumulated gradients) to the eager step's measured peak on top of them."""
    model, inputs, loss_fn = _gpt2()
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = storage_bytes(list(model.parameters()) + list(inputs.values())) + 2 * grads
    eager, _ = measure_peak(lambda: _micro_step(model, inputs, loss_fn, seed=0))
    model.zero_grad(set_to_none=True)
    budget = floor + 0.85 * eager
    p = planner.plan(model, budget / planner.GiB, inputs, world_size=WORLD, sharding="ddp", loss_fn=loss_fn,
                     grad_accumulation=True)
    assert p.recomputed and (p.training_loop.loss, p.training_loop.grad_accumulation) == ("loss_fn", True)
    assert p.training_loop.loss_peak_bytes > 0 and p.distributed.sharding == "ddp"
    return p


@pytest.mark.parametrize("kwargs, match", [({"sharding": "fsdp"}, "sharding='fsdp' is not supported"),
                                           ({"deepspeed": {"train_micro_batch_size_per_gpu": 2}}, "gradient_accumulation_steps")])
def test_accumulation_refused_where_the_engine_keeps_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        planner.plan(_model(), 1.0, _inputs(0), world_size=WORLD, grad_accumulation=True, **kwargs)


def test_engine_bytes_per_rank():
    model = _model()
    params = list(model.parameters())
    full = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    assert grads < full  # ResidualNet has a frozen layer
    ddp = engine_bytes(model, Distributed(world_size=4, sharding="ddp"))
    assert ddp.forward == ddp.backward == ddp.end == grads and ddp.optimizer == 0
    fsdp = engine_bytes(model, Distributed(world_size=4, sharding="fsdp", optimizer="adamw"))
    trainable = sum(1 for p in params if p.requires_grad)
    assert fsdp.optimizer == 2 * grads // 4 + 4 * trainable  # every dim 0 here divides by 4
    assert fsdp.backward == full // 4 + fsdp.optimizer
    assert fsdp.forward == fsdp.backward + full
    single = engine_bytes(model, Distributed(optimizer="adamw"))
    assert single.held == 2 * grads + 4 * trainable


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"world_size": 2}, "needs sharding"),
        ({"world_size": 0, "sharding": "ddp"}, "world_size"),
        ({"world_size": 2, "sharding": "zero3"}, "unknown sharding"),
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"world_size": 2, "sharding": "ddp", "optimizer": "sgd"}, "unknown optimizer"),
    ],
)
def test_bad_distributed_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        planner.plan(_model(), 1.0, _inputs(0), **kwargs)


def test_budget_too_small_counts_the_engine(single):
    model, step = single
    with pytest.raises(planner.BudgetTooSmall) as alone:
        step.plan(planner.api.check_budget(1e-6))
    kw = {"world_size": WORLD, "sharding": "ddp", "optimizer": "adamw"}
    engine = engine_bytes(model, Distributed(**kw))
    with planner.prepare(model, _inputs(0), **kw) as ranked_step:  # one capture for the three per-rank plans
        with pytest.raises(planner.BudgetTooSmall) as ranked:
            ranked_step.plan(planner.api.check_budget(1e-6))
        # DDP adds the same bytes to forward and backward: the lowest plan is the same, its
        # per-rank peak is the engine's bytes higher, and the minimum keeps the CPU margin
        # (a fraction of the whole per-rank budget) on top.
        low, low_ranked = alone.value.min_budget_bytes, ranked.value.min_budget_bytes
        margin = SAFETY["cpu"]
        assert low + engine.held < low_ranked <= (low + engine.held) / (1 - margin) + 2
        p = ranked_step.plan(low_ranked)
        assert p.predicted_peak_bytes <= p.budget_bytes
        with pytest.raises(planner.BudgetTooSmall):
            ranked_step.plan(low + engine.held)
    assert planner.Plan.from_json(p.to_json()) == p
    import jsonschema

    schema = json.loads((Path(__file__).parents[1] / "docs" / "plan.schema.json").read_text())
    jsonschema.validate(json.loads(p.to_json()), schema, cls=jsonschema.Draft202012Validator)


def test_wrappers_inside_the_plan_are_refused(single):
    model, step = single
    p = step.plan(planner.GiB)

    class Outer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    from torch.distributed.fsdp import FSDPModule

    inner = copy.deepcopy(model)
    # FSDP2 marks a module by changing its class; no process group is needed to see it
    inner.__class__ = type("FSDPResidualNet", (FSDPModule, type(inner)), {})
    with pytest.raises(TypeError, match=r"submodule 'inner' is wrapped by fully_shard"):
        runtime.apply(Outer(inner), p)


def test_cli_plans_per_rank(tmp_path, capsys):
    from runtime.tools.cli import main

    factory = str(Path(__file__).parents[1] / "examples" / "tiny_models.py") + ":residual_mlp"
    out = tmp_path / "plan.json"
    assert main(["plan", factory, "--budget-gb", "0.01", "--world-size", "2", "--sharding", "fsdp", "--optimizer", "adamw",
                 "-q", "-o", str(out)]) == 0
    p = planner.Plan.from_json(out)
    assert (p.distributed.world_size, p.distributed.sharding, p.distributed.optimizer) == (2, "fsdp", "adamw")
    assert p.predicted_peak_bytes <= p.budget_bytes
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    assert "per rank of 2 (fsdp, optimizer adamw; the engine adds" in capsys.readouterr().out
    assert main(["plan", factory, "--budget-gb", "0.01", "--world-size", "2", "-q"]) == 2
    assert "needs sharding='ddp' or sharding='fsdp'" in capsys.readouterr().err
