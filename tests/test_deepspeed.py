"""Planned modules inside DeepSpeed engines: ZeRO-2 with 4 accumulated micro-batches on 2 gloo ranks,
fp32 and bf16.

The training test plans in this process with ``plan(..., deepspeed=config)`` (per-rank
budget: what the engine holds plus part of the step), then spawns 2 ranks. Every
rank trains the same model twice under ``deepspeed.initialize`` with its own data
for two accumulation windows (8 micro-steps, 2 optimizer steps): without a plan
(the reference) and as ``runtime.apply(model, plan)``; losses and final weights
must be equal. The planned engine's second window (its forwards and backwards,
Adam's state live) is measured from torch.profiler allocator events: each rank's
peak must be within the budget and within 5% of the plan's prediction. One of the
models breaks the graph (``helpers.BreakyLM``: a ``print`` and a branch on a tensor
between its blocks), so its plan is three graph regions, each split by its own decisions.

The training test needs the ``[deepspeed]`` extra (``pip install -e '.[deepspeed]'``) and
is skipped without it; run it alone with ``python -m pytest -q -m deepspeed tests``. The
other tests read configs and count bytes, without DeepSpeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import planner
import runtime
from helpers import BreakyLM, tiny_gpt2
from planner.deepspeed import engine_bytes, rank_engine_bytes
from planner.deepspeed_config import read_config

from deepspeed_harness import WORLD, ds_init, train
from dist_harness import spawn

EXAMPLES = Path(__file__).parents[1] / "examples" / "deepspeed_tutorial"
sys.path.insert(0, str(EXAMPLES))
from simple_model import SimpleModel, batch  # noqa: E402

# The tutorial's config (examples/deepspeed_tutorial/ds_config.json: ZeRO-2, train_batch_size 16,
# gradient_accumulation_steps 4, AdamW with torch_adam) with the reduce bucket sized to the model:
# DeepSpeed's default bucket (5e8 elements, 1.9 GiB in fp32) is allocated at the end of backward
# and would be the rank's peak whatever is checkpointed.
TUTORIAL = json.loads((EXAMPLES / "ds_config.json").read_text())
SIMPLE = {**TUTORIAL, "zero_optimization": {"stage": 2, "reduce_bucket_size": 1_200_000}}
GPT2 = {
    "train_batch_size": 16, "gradient_accumulation_steps": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 200_000},
}


def _simple():
    torch.manual_seed(0)
    return SimpleModel().train()


def _gpt2():
    torch.manual_seed(0)
    return tiny_gpt2().train()


def _gpt2_bf16():
    return _gpt2().to(torch.bfloat16)


def _regions():
    torch.manual_seed(0)
    return BreakyLM(vocab=128).train()


def _batches(name: str, rank: int, n: int) -> list[dict]:
    if name == "simple":  # the tutorial's micro-batch of 2, over 256 tokens
        return [batch(tokens=256, seed=100 * rank + i) for i in range(n)]
    g = torch.Generator().manual_seed(1 + rank)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 64), generator=g)
        out.append({"input_ids": ids, "labels": ids, "use_cache": False})
    return out


#: model -> (builder, DeepSpeed config, budget as a fraction of the no-checkpoint per-rank peak)
MODELS = {"simple": (_simple, SIMPLE, 0.94), "gpt2": (_gpt2, GPT2, 0.88),
          "gpt2-bf16": (_gpt2_bf16, {**GPT2, "bf16": {"enabled": True}}, 0.88),
          "regions": (_regions, {**GPT2, "zero_optimization": {"stage": 2, "reduce_bucket_size": 20_000}}, 0.88)}
#: Models whose loop holds their outputs until backward ends, as the planner counts them. The others
#: keep only the loss: their prediction is high by the logits (GPT-2: 65,536 B, about 2% of its peak;
#: the region model's logits would be 6% of its peak, over the 5% the test allows).
HOLD_OUTPUTS = {"regions"}


def _worker(rank: int, port: int, plans: dict, out_dir: str) -> None:
    import torch.distributed as dist

    ds_init(rank, port)
    try:
        result = {}
        for name, plan_json in plans.items():
            build, config, _ = MODELS[name]
            plan = planner.Plan.from_json(plan_json)
            base = build()
            batches = _batches(name, rank, 2 * config["gradient_accumulation_steps"])
            ref = train(lambda m: m, base, config, batches)
            got = train(lambda m, plan=plan: runtime.apply(m, plan), base, config, batches, measure=True,
                        hold_outputs=name in HOLD_OUTPUTS)
            torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
            for k in ref["weights"]:
                torch.testing.assert_close(got["weights"][k], ref["weights"][k], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, k=k: f"{name}, rank {rank}, weight {k}: {m}")
            result[name] = {k: got[k] for k in ("peak", "missed_frees", "step_peak", "losses")}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _plan(name: str) -> planner.Plan:
    """A per-rank plan for the model's DeepSpeed config at its fraction of the no-checkpoint peak."""
    build, config, fraction = MODELS[name]
    model, inputs = build(), _batches(name, 0, 1)[0]
    eager = planner.plan(model, 64.0, inputs, deepspeed=config, world_size=WORLD)
    return planner.plan(model, fraction * eager.baseline_peak_bytes / planner.GiB, inputs, deepspeed=config,
                        world_size=WORLD)


@pytest.mark.deepspeed
def test_zero2_accumulation_planned_equals_unplanned_within_budget(tmp_path):
    """SimpleModel, a small GPT-2 (fp32, and bf16 with the config's ``bf16``) and a model that
    breaks the graph (three regions), each planned for one rank of a ZeRO-2 engine with 4
    accumulated micro-batches, train on 2 ranks as the unplanned engine does."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install -e '.[deepspeed]'")
    plans = {name: _plan(name) for name in MODELS}
    for name, p in plans.items():
        assert p.recomputed, f"{name}: the budget should force recomputation"
        assert p.predicted_peak_bytes <= p.budget_bytes
        d = p.distributed
        assert (d.sharding, d.world_size, d.optimizer) == ("deepspeed", WORLD, "adamw")
        assert (d.deepspeed["stage"], d.deepspeed["accumulation"], d.deepspeed["micro_batch"]) == (2, 4, 2)
        assert len(p.regions) == (3 if name == "regions" else 0), name
    spawn(_worker, {name: p.to_json() for name, p in plans.items()}, str(tmp_path))
    for rank in range(WORLD):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, p in plans.items():
            peak = r[name]["peak"]
            assert peak <= p.budget_bytes, f"{name}, rank {rank}: measured {peak} > budget {p.budget_bytes} ({r[name]})"
            assert abs(peak - p.predicted_peak_bytes) <= 0.05 * peak, (name, rank, peak, p.predicted_peak_bytes)


def test_read_config_tutorial():
    s = read_config(EXAMPLES / "ds_config.json", world_size=2)
    assert (s.world_size, s.stage, s.micro_batch, s.accumulation, s.optimizer, s.precision) == (2, 2, 2, 4, "adamw", "fp32")
    assert (s.reduce_bucket_size, s.allgather_bucket_size, s.contiguous_gradients) == (500_000_000, 500_000_000, True)
    with pytest.raises(ValueError, match="does not fix the number of ranks"):
        read_config(EXAMPLES / "ds_config.json")
    with pytest.raises(ValueError, match="not a multiple"):
        read_config({"train_batch_size": 6, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1})
    assert read_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}).world_size == 4


@pytest.mark.parametrize(
    "config, match",
    [
        ({"train_batch_size": 8, "zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported.*ZeRO stage 2.*fully_shard"),
        ({"train_batch_size": 8, "fp16": {"enabled": True}}, "fp16"),
        ({"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
        ({"train_batch_size": 8, "optimizer": {"type": "Lamb"}}, "Lamb.*not modelled"),
        ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": "auto"}, "auto"),
        ({"train_batch_size": 6, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, "train_batch_size 6 != .* x 2 ranks"),
        ({"train_batch_size": 8, "zero_optimization": {"stage": 2, "overlap_comm": True}}, "overlap_comm"),
    ],
)
def test_read_config_refuses_what_it_does_not_model(config, match):
    with pytest.raises(ValueError, match=match):
        read_config(config, world_size=2)


def test_engine_bytes_by_stage():
    model = _gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    grads = 4 * n
    base = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam"}}
    s0 = engine_bytes(model, read_config({**base, "gradient_accumulation_steps": 4}, world_size=2))
    adam = 2 * grads + 4 * len(params) + 8
    assert (s0.forward, s0.end, s0.optimizer) == (adam + grads, adam + grads, adam)  # summed grads; one flat copy
    zero = {"stage": 2, "reduce_bucket_size": 10 * n}
    s2 = read_config({**base, "gradient_accumulation_steps": 4, "zero_optimization": zero}, world_size=2)
    flat = -(-n // 4) * 4
    part = flat // 2
    per_rank = [rank_engine_bytes(model, s2, r) for r in range(2)]
    for eb in per_rank:
        assert eb.optimizer == 2 * 4 * part + 4 + 8
        static = (flat - n) * 4 + 4 * part + eb.optimizer
        held = eb.forward - static
        assert part * 4 <= held <= n * 4  # whole parameters overlapping the rank's half
        assert eb.end == eb.forward + 10 * n * 4  # the bucket holds every gradient
    assert engine_bytes(model, s2).forward == max(eb.forward for eb in per_rank)
    s1 = read_config({**base, "gradient_accumulation_steps": 4, "zero_optimization": {**zero, "stage": 1}}, world_size=2)
    one = rank_engine_bytes(model, s1, 0)
    assert one.forward - one.optimizer == (flat - n) * 4 + 4 * part + grads + 10 * n * 4  # full grads and the bucket held


def test_plan_checks_precision_and_options():
    model = _simple()
    bf16 = {**SIMPLE, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1, "reduce_bucket_size": 1_200_000}}
    with pytest.raises(ValueError, match=r"model.to\(torch.bfloat16\)"):
        planner.plan(model, 1.0, batch(tokens=16), deepspeed=bf16, world_size=WORLD)
    with pytest.raises(ValueError, match="DeepSpeed is the engine"):
        planner.plan(model, 1.0, batch(tokens=16), deepspeed=SIMPLE, sharding="ddp")
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported.*ZeRO stage 2.*fully_shard"):
        planner.plan(model, 1.0, batch(tokens=16), deepspeed={**SIMPLE, "zero_optimization": {"stage": 3}})
    p = planner.plan(model.to(torch.bfloat16), 1.0, batch(tokens=16, dtype=torch.bfloat16), deepspeed=bf16, world_size=4)
    assert (p.distributed.world_size, p.distributed.deepspeed["precision"]) == (4, "bf16")
    assert planner.Plan.from_json(p.to_json()) == p
    import jsonschema

    schema = json.loads((Path(__file__).parents[1] / "docs" / "plan.schema.json").read_text())
    jsonschema.validate(json.loads(p.to_json()), schema, cls=jsonschema.Draft202012Validator)


def test_cli_plans_for_the_tutorial_config(tmp_path, capsys):
    from runtime.tools.cli import main

    out = tmp_path / "plan.json"
    factory = f"{EXAMPLES / 'simple_model.py'}:simple_model"
    assert main(["plan", factory, "--budget-gb", "3", "--deepspeed", str(EXAMPLES / "ds_config.json"),
                 "--world-size", "2", "-o", str(out), "-q"]) == 0
    d = planner.Plan.from_json(out.read_text()).distributed
    assert (d.sharding, d.world_size, d.deepspeed["stage"], d.deepspeed["accumulation"]) == ("deepspeed", 2, 2, 4)
    assert d.end_bytes > 500_000_000 * 4  # DeepSpeed's default reduce bucket: 5e8 fp32 elements, whatever is checkpointed
    assert main(["plan", factory, "--budget-gb", "1", "--deepspeed", str(EXAMPLES / "ds_config.json"), "-q"]) == 2
    assert "does not fix the number of ranks" in capsys.readouterr().err


@pytest.mark.deepspeed
def test_trainer_with_deepspeed_argument_equals_the_unplanned_trainer():
    """``examples/deepspeed_tutorial/trainer_gpt2.py``: ``transformers.Trainer(args=TrainingArguments(deepspeed=config))``
    with ``plan_trainer(trainer, budget, deepspeed=config)`` (ZeRO-2, one process) recomputes and ends with the
    weights of the same Trainer without a plan."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install -e '.[deepspeed]'")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(EXAMPLES.parents[1])}
    r = subprocess.run([sys.executable, str(EXAMPLES / "trainer_gpt2.py")], capture_output=True, text=True,
                       timeout=600, env=env, cwd=EXAMPLES)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    recomputed = int(r.stdout.split("plan: ")[1].split(" values recomputed")[0])
    assert recomputed > 0, r.stdout
    assert "weights after 2 steps: equal to the Trainer without a plan" in r.stdout
