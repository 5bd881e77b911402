"""A deep stack of identical layers is traced with four of them and repeated
(``profiles.repeat_capture``): the graph must be the one tracing the whole model
gives, node for node, with the same primals and the same simulated memory.

Planning and running such a model end to end (exact gradients, measured peak
within the budget) is ``tests/test_end_to_end.py``'s "tied" (10 layers) and
"residual" (8 blocks) cases, whose captures are repeated: checked here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from helpers import ResidualNet, TiedNet, tiny_gpt2
from planner.joint_index import fast_schedule
from planner.problem import build_problem
from planner.simulate import simulate
from planner.sqrt import solve_sqrt
import planner
from profiles import capture, profile_graph
from profiles.layer_stack import find_layer_stack
from profiles import repeat_capture
from profiles.repeat_capture import CAPTURED

#: Layers of the test models: two more than traced, so layer 1 is copied twice.
DEPTH = CAPTURED + 2
#: The depth from which the library repeats layers.
LIBRARY_DEPTH = repeat_capture.MIN_DEPTH


@pytest.fixture(autouse=True)
def _repeat_six_layers(monkeypatch):
    """Stacks of DEPTH layers are repeated (the library waits for deeper ones)."""
    monkeypatch.setattr(repeat_capture, "MIN_DEPTH", DEPTH)


def _gpt2(use_cache: bool):
    torch.manual_seed(0)
    model = tiny_gpt2(layers=DEPTH, d=32, heads=2, vocab=64, positions=16)
    model.config.use_cache = use_cache
    ids = torch.randint(0, 64, (2, 16))
    return model, {"input_ids": ids, "labels": ids}


def _llama(device: str):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, use_cache=False)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
        ids = torch.randint(0, 64, (2, 16))
    return model, {"input_ids": ids, "labels": ids}


def _profiled(joint) -> tuple:
    """Every node's profile (bytes, storages, whether recomputable, ...), the storages'
    sizes, and the simulated peaks recomputing nothing and recomputing sqrt(L)'s choice."""
    gp = profile_graph(joint, measure_time=False, measure_temps=False)
    sqrt = solve_sqrt(build_problem(gp).unarranged(), None).evaluation.recompute
    return (gp.nodes, gp.storage_bytes, gp.static_storages, simulate(gp, fast_schedule(joint, frozenset())).peak_bytes,
            simulate(gp, fast_schedule(joint, sqrt)).peak_bytes, frozenset(sqrt))


def _residual():
    """Dropout, an in-place op between blocks, a frozen layer, and BatchNorm after the blocks (a buffer updated in place)."""
    torch.manual_seed(0)
    return ResidualNet(d=32, blocks=DEPTH, hidden=64), {"x": torch.randn(64, 32), "target": torch.randint(0, 8, (64,))}


@pytest.mark.parametrize("make", [lambda: _gpt2(False), lambda: _llama("meta"), _residual],
                         ids=["gpt2", "llama-meta", "residual"])
def test_repeated_graph_is_the_traced_graph(make):
    model, inputs = make()
    repeated = capture(model, inputs)
    whole = capture(model, inputs, repeat=False)
    stack = find_layer_stack(model, DEPTH)
    assert repeated.repeated == (stack.path, CAPTURED, DEPTH) and whole.repeated == ()
    assert repeated.fingerprint == whole.fingerprint
    assert repeated.node_digests == whole.node_digests
    assert repeated.primal_names == whole.primal_names and repeated.primal_roles == whole.primal_roles
    assert len(repeated.primal_values) == len(whole.primal_values)
    assert all(a is b for a, b in zip(repeated.primal_values, whole.primal_values))
    after = [(n.name, str(n.target), repr(n.args)) for n in repeated.gm.graph.nodes]  # after prepare_joint (dropout)
    assert after == [(n.name, str(n.target), repr(n.args)) for n in whole.gm.graph.nodes]
    assert _profiled(repeated) == _profiled(whole)


def test_a_model_returning_each_layers_values_is_traced_whole():
    model, inputs = _gpt2(True)  # use_cache: every layer's keys and values are outputs
    assert find_layer_stack(model, DEPTH) is not None
    assert capture(model, inputs).repeated == ()


def test_layer_stacks():
    class Uneven(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4 if i else 8) for i in range(DEPTH))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            one = nn.Linear(4, 4)
            self.layers = nn.ModuleList(one for _ in range(DEPTH))

    class Numbered(nn.Module):  # each layer knows its index (HF's layer_idx) and may hold a setting
        def __init__(self, window_at: int | None = None):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(DEPTH))
            for i, layer in enumerate(self.layers):
                layer.layer_idx, layer.window = i, 16 if i == window_at else None

    assert find_layer_stack(Uneven(), DEPTH) is None
    assert find_layer_stack(Shared(), DEPTH) is None
    assert find_layer_stack(Numbered(), DEPTH) is not None
    assert find_layer_stack(Numbered(window_at=DEPTH - 1), DEPTH) is None  # layer 5 differs: trace every layer
    mixed = Numbered()
    mixed.config = type("Config", (), {"layer_types": ["sliding_attention"] * (DEPTH - 1) + ["full_attention"]})()
    assert find_layer_stack(mixed, DEPTH) is None
    assert find_layer_stack(TiedNet(layers=DEPTH - 1), DEPTH) is None
    stack = find_layer_stack(TiedNet(layers=DEPTH), DEPTH)
    assert (stack.path, stack.depth) == ("layers", DEPTH)


@pytest.mark.parametrize("make", [lambda: (TiedNet(vocab=100, d=64, layers=10), (torch.randint(0, 100, (16, 64)),)),
                                  lambda: (ResidualNet(d=64, blocks=8, hidden=256),
                                           {"x": torch.randn(512, 64), "target": torch.randint(0, 8, (512,))})],
                         ids=["tied", "residual"])
def test_end_to_end_models_are_repeated(make, monkeypatch):
    monkeypatch.setattr(repeat_capture, "MIN_DEPTH", LIBRARY_DEPTH)
    torch.manual_seed(0)
    model, inputs = make()
    stack = find_layer_stack(model, LIBRARY_DEPTH)
    assert capture(model, inputs).repeated == (stack.path, CAPTURED, stack.depth)


def test_the_plan_says_how_the_step_was_traced(monkeypatch):
    monkeypatch.setattr(repeat_capture, "MIN_DEPTH", LIBRARY_DEPTH)
    torch.manual_seed(0)
    model, ids = TiedNet(vocab=100, d=32, layers=LIBRARY_DEPTH), torch.randint(0, 100, (4, 16))
    p = planner.plan(model, 1.0, (ids,))
    assert p.model.repeated == ("layers", CAPTURED, LIBRARY_DEPTH)
    assert f"traced:                {CAPTURED} of the {LIBRARY_DEPTH} layers of layers" in p.summary()
    d = json.loads(p.to_json())
    jsonschema.validate(d, json.loads((Path(__file__).parents[1] / "docs" / "plan.schema.json").read_text()))
    assert planner.Plan.from_json(p.to_json()).model == p.model
    monkeypatch.setenv("PLANNER_REPEAT_LAYERS", "0")
    assert capture(model, (ids,)).repeated == ()
