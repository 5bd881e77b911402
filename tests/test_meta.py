"""Planning for hardware you don't have: models built on the meta device, device
profiles as data, and ``planner calibrate``."""

from __future__ import annotations

import json

import pytest
import torch

import planner
import runtime
from helpers import ResidualNet, assert_same_step, measured_step_peak
from planner.api import plan_profile
from runtime.tools.cli import main as cli_main
from profiles import available_targets, capture, load_device_profile, measure_peak, profile_graph
from profiles.allocator import SAFETY


def _residual(device: str):
    """Activations dominate (a 112 MiB step, 16 MiB of it parameters),
    with dropout, BatchNorm, a frozen layer, an in-place op and a cross-entropy loss
    (whose meta kernel would drop the backward if traced on meta tensors)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = ResidualNet(d=256, blocks=4, hidden=2048)
        inputs = {"x": torch.randn(1024, 256), "target": torch.randint(0, 8, (1024,))}
    return model, inputs


def test_meta_model_plans_without_allocating():
    model, inputs = _residual("meta")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    allocated, p = measure_peak(lambda: planner.plan(model, 0.09, inputs, target="h100"))
    # Nothing the size of a parameter or an activation was allocated: the whole
    # planning call allocated less than a tenth of the parameters' bytes.
    assert allocated < param_bytes / 10, f"planning a meta model allocated {allocated} bytes"
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])  # given back as it was
    assert p.recomputed and p.predicted_peak_bytes <= 0.09 * 2**30 * (1 - SAFETY["cuda"])
    assert p.static_bytes > param_bytes and p.target == "h100"
    assert p.time_source.startswith("roofline:h100") and "temporaries not measured" in p.time_source


def test_meta_plan_for_cpu_equals_the_cpu_plan_and_runs_on_the_real_model():
    meta_model, meta_inputs = _residual("meta")
    cpu_model, cpu_inputs = _residual("cpu")
    budget_gb = 0.08  # about 75% of the no-checkpoint peak (0.11 GiB)
    cpu_plan = planner.plan(cpu_model, budget_gb, cpu_inputs, target="cpu")
    assert cpu_plan.baseline_peak_bytes > cpu_plan.budget_bytes
    meta_plan = planner.plan(meta_model, budget_gb, meta_inputs, target="cpu")
    # Same graph, same roofline, and for a CPU target the meta model's op
    # temporaries are measured on synthetic inputs as the CPU model's are: the
    # same plan, field by field.
    assert meta_plan.fingerprint == cpu_plan.fingerprint
    assert meta_plan.recomputed and meta_plan.recomputed == cpu_plan.recomputed and meta_plan.saved == cpu_plan.saved
    for field in ("static_bytes", "baseline_peak_bytes", "predicted_peak_bytes", "total_flops", "recompute_flops",
                  "recompute_time_s", "timeline", "baseline_timeline", "dropout"):
        assert getattr(meta_plan, field) == getattr(cpu_plan, field), field
    assert "temporaries measured on synthetic CPU inputs" in meta_plan.time_source
    # Planned on meta, run for real: the plan applies to the model built on the CPU,
    # stays within its budget and gives eager's gradients.
    wrapped = runtime.apply(cpu_model, meta_plan)
    measured_step_peak(wrapped, cpu_model, cpu_inputs)  # compiles
    assert measured_step_peak(wrapped, cpu_model, cpu_inputs) <= meta_plan.budget_bytes
    assert_same_step(cpu_model, lambda m: runtime.apply(m, meta_plan), cpu_inputs)
    # Without the temporaries (as for a GPU target) the no-checkpoint peak is lower.
    gp = profile_graph(capture(meta_model, meta_inputs), target="cpu", measure_temps=False)
    assert plan_profile(gp, 2**40).baseline_peak_bytes < meta_plan.baseline_peak_bytes


def test_meta_model_refuses_measured_times():
    model, inputs = _residual("meta")
    with pytest.raises(ValueError, match="meta device"):
        planner.plan(model, 1.0, inputs, target="h100", measure_time=True)


def _llama(device: str):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=256, max_position_embeddings=128)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).train()
        ids = torch.randint(0, 256, (4, 128))
    return model, {"input_ids": ids, "labels": ids}


def test_hf_llama_on_meta_for_h100():
    model, inputs = _llama("meta")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    p = planner.plan(model, 0.0035, inputs, target="h100", solver="sqrt")  # about 60% of the no-checkpoint peak
    assert p.target == "h100" and p.time_source.startswith("roofline:h100")
    assert p.baseline_peak_bytes > p.budget_bytes and p.recomputed
    # Planned for the H100's allocator: a recomputing plan keeps the CUDA margin free.
    assert p.predicted_peak_bytes <= p.budget_bytes * (1 - SAFETY["cuda"])
    # Static: parameters, the buffers forward reads (rotary inv_freq, not its unused
    # copy original_inv_freq) and the ids (input_ids is labels: one tensor), each
    # block rounded up to 512 bytes as the H100's caching allocator does; the peak
    # holds at least the parameters' gradients on top.
    def blocks(tensors):
        return sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)

    fixed = blocks([*model.parameters(), inputs["input_ids"]])
    assert fixed < p.static_bytes <= fixed + blocks(model.buffers())
    assert p.baseline_peak_bytes >= p.static_bytes + params
    assert p.baseline_peak_bytes % 512 == 0 and p.predicted_peak_bytes % 512 == 0
    # Module paths as model.named_modules() spells them (forward is wrapped by a
    # decorator here: dynamo reaches the model as L['args'][0]).
    names = dict(model.named_modules())
    assert {n.module for n in p.nodes} <= set(names) and "model.layers.1.mlp.down_proj" in {n.module for n in p.nodes}
    # The same model built on the CPU captures the same graph (the CPU attention
    # kernel: see README's known limits).
    cpu_model, cpu_inputs = _llama("cpu")
    assert capture(cpu_model, cpu_inputs).fingerprint == p.fingerprint


def test_device_profiles_have_a_source_for_every_number():
    names = available_targets()
    assert {"cpu", "h100", "h200", "a100", "l4", "rtx4090"} <= set(names)
    for name in names:
        prof = load_device_profile(name)
        assert prof.unsourced() == [], f"{name}: no source for {prof.unsourced()}"
        assert prof.memory_bytes > 0 and prof.bandwidth_bytes_per_s > 0 and prof.device_type in ("cpu", "cuda")
        assert {"float32", "bfloat16"} <= set(prof.peak_flops)
    h100 = load_device_profile("h100")
    assert h100.peak_flops["bfloat16"] == pytest.approx(989e12, rel=0.01) and h100.memory_bytes == 80 * 2**30


def test_calibrate_writes_a_profile_that_plans(tmp_path, capsys):
    out = tmp_path / "here.json"
    assert cli_main(["calibrate", "-o", str(out), "--device", "cpu", "--matmul-size", "64", "--copy-mib", "4",
                     "--repeats", "2", "-q"]) == 0
    data = json.loads(out.read_text())
    prof = load_device_profile(str(out))
    assert prof.name == "here" and prof.device_type == "cpu" and prof.unsourced() == []
    assert prof.peak_flops["float32"] > 0 and prof.bandwidth_bytes_per_s > 0 and 0 < prof.overhead_s < 1
    assert "measured by planner calibrate" in data["sources"]["peak_flops.float32"]
    model, inputs = _residual("meta")
    p = planner.plan(model, 1.0, inputs, target=str(out))
    assert p.target == "here" and p.time_source.startswith("roofline:here")
    assert cli_main(["calibrate", "-o", str(tmp_path / "here.txt")]) == 2
    assert ".json" in capsys.readouterr().err
