"""planner.optimizer_memory against the measured peaks of real optimizer steps on real models."""

from __future__ import annotations

import pytest
import torch

from planner.optimizer_memory import OptimizerMemory, OptimizerSpec, default_implementation, optimizer_memory
from profiles import measure_peak, storage_bytes

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def _gpt2_mixed():
    """fp32 and bf16 parameters: two (device, dtype) groups for foreach."""
    model = _gpt2()
    model.transformer.h[1].to(torch.bfloat16)
    return model


def _llama_frozen():
    """A Llama whose embedding is frozen (no gradient, no state)."""
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=160, vocab_size=300, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


MODELS = {"gpt2": _gpt2, "gpt2-mixed": _gpt2_mixed, "llama-frozen": _llama_frozen}

#: (spec, the torch.optim constructor's keyword arguments)
CASES = [
    (OptimizerSpec(name="adamw"), {}),
    (OptimizerSpec(name="adamw", implementation="foreach"), {"foreach": True}),
    (OptimizerSpec(name="adamw", implementation="fused"), {"fused": True}),
    (OptimizerSpec(name="adamw", implementation="for-loop", amsgrad=True), {"foreach": False, "amsgrad": True}),
    (OptimizerSpec(name="adamw", implementation="foreach", maximize=True), {"foreach": True, "maximize": True}),
    (OptimizerSpec(name="adamw", implementation="for-loop", maximize=True), {"foreach": False, "maximize": True}),
    (OptimizerSpec(name="adam", implementation="for-loop", weight_decay=0.1), {"foreach": False, "weight_decay": 0.1}),
    (OptimizerSpec(name="adam", implementation="foreach", weight_decay=0.1), {"foreach": True, "weight_decay": 0.1}),
    (OptimizerSpec(name="sgd", momentum=0.9), {"momentum": 0.9}),
    (OptimizerSpec(name="sgd", implementation="foreach", momentum=0.9), {"momentum": 0.9, "foreach": True}),
    (OptimizerSpec(name="sgd", implementation="fused", momentum=0.9), {"momentum": 0.9, "fused": True}),
    (
        OptimizerSpec(name="sgd", implementation="for-loop", momentum=0.9, nesterov=True, weight_decay=0.01),
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "foreach": False},
    ),
    (
        OptimizerSpec(name="sgd", implementation="foreach", momentum=0.9, nesterov=True, weight_decay=0.01),
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "foreach": True},
    ),
]

_CLASSES = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def _measure(params, spec: OptimizerSpec, kwargs: dict) -> OptimizerMemory:
    """Two real iterations (``step()`` then ``zero_grad()``) on random gradients."""
    gen = torch.Generator().manual_seed(0)
    trainable = [p for p in params if p.requires_grad] if not isinstance(params[0], dict) else [
        p for g in params for p in g["params"] if p.requires_grad
    ]
    for p in trainable:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt = _CLASSES[spec.name](params, lr=0.1, **kwargs)

    def iteration():
        opt.step()
        opt.zero_grad(set_to_none=False)

    first, _ = measure_peak(iteration)
    state = storage_bytes(t for s in opt.state.values() for t in s.values())
    later, _ = measure_peak(iteration)
    return OptimizerMemory(implementation=spec.implementation, state_bytes=state, first_step_peak_bytes=first,
                           step_peak_bytes=later)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("spec,kwargs", CASES, ids=[f"{s.name}-{s.implementation}-{i}" for i, (s, _) in enumerate(CASES)])
def test_predicted_equals_measured(model_name, spec, kwargs):
    torch.manual_seed(0)
    params = list(MODELS[model_name]().parameters())
    measured = _measure(params, spec, kwargs)
    predicted = optimizer_memory(params, spec)
    assert predicted.state_bytes == measured.state_bytes
    assert predicted.first_step_peak_bytes == measured.first_step_peak_bytes
    assert predicted.step_peak_bytes == measured.step_peak_bytes


def test_parameter_groups_with_their_own_weight_decay():
    """Adam's L2 decay copies gradients only in the group that decays."""
    torch.manual_seed(0)
    model = _gpt2()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    spec = OptimizerSpec(name="adam", implementation="for-loop")
    measured = _measure(groups, spec, {"foreach": False})
    predicted = optimizer_memory(groups, spec)
    assert predicted.step_peak_bytes == measured.step_peak_bytes
    assert predicted.first_step_peak_bytes == measured.first_step_peak_bytes
    # mlp.c_proj.weight right after mlp.c_fc.weight (64 x 256 fp32 each): the previous
    # denominator, the decayed gradient copy, the sqrt and the quotient, and a wrapped scalar
    assert predicted.step_peak_bytes == 4 * 64 * 256 * 4 + 12


def test_meta_parameters_give_the_same_numbers():
    torch.manual_seed(0)
    real = list(_gpt2_mixed().parameters())
    with torch.device("meta"):
        meta = list(_gpt2_mixed().parameters())
    for spec, _ in CASES:
        assert optimizer_memory(meta, spec, device_type="cpu") == optimizer_memory(real, spec)


def test_defaults_and_foreach_on_cuda_parameters():
    """On CUDA torch picks foreach: AdamW's step holds the whole sqrt list (rounded
    to the caching allocator's 512-byte blocks); the step counters stay on the CPU."""
    with torch.device("meta"):
        params = list(_gpt2().parameters())
    assert default_implementation("cpu") == "for-loop"
    assert default_implementation("cuda") == "foreach"
    mem = optimizer_memory(params, OptimizerSpec(name="adamw"), device_type="cuda", granularity=512)
    blocks = sum(-(-p.numel() * 4 // 512) * 512 for p in params)
    assert mem.implementation == "foreach"
    assert mem.state_bytes == 2 * blocks
    assert mem.step_peak_bytes == blocks
    assert mem.first_step_peak_bytes == 3 * blocks


def test_meta_parameters_need_a_device_type():
    with torch.device("meta"):
        params = list(_gpt2().parameters())
    with pytest.raises(ValueError, match="device_type="):
        optimizer_memory(params, OptimizerSpec(name="adamw"))


def test_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        OptimizerSpec(name="lamb")
    with pytest.raises(ValueError, match="unknown implementation 'vectorized'"):
        OptimizerSpec(name="adamw", implementation="vectorized")
