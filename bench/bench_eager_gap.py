"""How the planner's no-checkpoint step compares with eager PyTorch, and why.

Random-init Hugging Face language models (2 layers, hidden 128, vocab 1000, batch
4 x 64, the loss inside the model via ``labels``, ``use_cache=False``), on this
machine's CPU. One training step each (forward, ``loss.backward()``, the caller
holding the outputs until backward ends); absolute peaks: ``profiles.measure_peak``
(allocator events) plus parameters, buffers and inputs. Columns:

- eager: the plain model;
- aot_eager: ``torch.compile(backend="aot_eager")`` as shipped, whose
  min-cut partitioner recomputes cheap ops (so it is not a no-recompute step);
- aot_default: ``backend="aot_eager_default_partitioner"``, torch's default
  partition, which saves every value backward needs: the same graphs as ours
  without arrangement;
- ours before / arranged / as run: the planner's no-checkpoint peak with the
  partition's node order; arranged (``planner.order.arrange``: reordered, buffers
  reused) with AOTAutograd's zero gradients for the outputs the loss does not flow
  through (the logits); and as the runtime runs it for a model that returns its
  loss, arranged and without those zero gradients (``planner.zero_tangents``), as
  predicted; "measured" runs ``runtime.apply`` of the no-checkpoint plan;
- the gap's parts: ``tangent`` = bytes of those zero gradients; ``saved`` = bytes
  backward keeps in our graphs minus what eager's autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``);
- with ``--minimum``: the lowest budget the planner reaches before and as run, as a
  fraction of eager's peak.

    python bench/bench_eager_gap.py [--models mistral,gpt_neox,...] [--minimum] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import inspect
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from planner.api import minimum_budget_bytes  # noqa: E402
from planner.problem import build_problem  # noqa: E402
from planner.joint_index import fast_schedule  # noqa: E402
from planner.zero_tangents import profile_as_run  # noqa: E402
from profiles import capture, measure_peak, profile_graph, storage_bytes  # noqa: E402

MiB = 2**20
H, LAYERS, VOCAB, BATCH, SEQ = 128, 2, 1000, 4, 64


def _config(name: str):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, use_cache=False)
    attn = dict(num_attention_heads=4, intermediate_size=2 * H)
    table = {
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**common, **attn, num_key_value_heads=2)),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, **attn, num_key_value_heads=2)),
        "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
            **common, **attn, num_key_value_heads=2, head_dim=32)),
        "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **common, **attn, num_key_value_heads=4, pad_token_id=0)),
        "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common, **attn)),
        "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            **common, num_attention_heads=4, ffn_dim=2 * H, word_embed_proj_dim=H, max_position_embeddings=128)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=LAYERS, n_embd=H, n_head=4, vocab_size=VOCAB, n_positions=128, use_cache=False)),
        # under torch.compile Hugging Face's Mamba takes an associative-scan path that
        # eager does not; "mamba_loop" runs the same sequential scan in both
        "mamba": lambda: transformers.MambaForCausalLM(transformers.MambaConfig(**common, state_size=4)),
        "mamba_loop": lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
            **common, state_size=4, use_associative_scan=False)),
    }
    return table[name]


def make(name: str):
    """A random-init model and its inputs (``labels``: the loss is inside); the
    benchmark GPT-2 and ResNet (``bench_gpt2``, ``bench_resnet``) come from
    ``bench/bench_checkpointing.py``."""
    import transformers

    if name.startswith("bench_"):
        import bench_checkpointing

        w = getattr(bench_checkpointing, f"make_{name[len('bench_'):]}")()
        if isinstance(w.inputs, dict):
            return w.model, w.inputs
        names = list(inspect.signature(w.model.forward).parameters)
        return w.model, dict(zip(names, w.inputs))

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name.startswith("whisper"):
        return _whisper(padded=name == "whisper_padded")
    model = _config(name)()
    model.train()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids.clone()}


def _whisper(padded: bool):
    """A random-init Whisper (2 encoder and 2 decoder layers, d_model 64, 4 heads, FFN
    128, 16 mel bins, 32 source positions) on 4 x 64 frames with 4 x 32 labels; with
    ``padded`` a ``decoder_attention_mask`` pads two of the label rows."""
    import transformers

    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=32, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
        eos_token_id=2, bos_token_id=1, use_cache=False)
    model = transformers.WhisperForConditionalGeneration(cfg)
    model.train()
    g = torch.Generator().manual_seed(1)
    inputs = {"input_features": torch.randn(BATCH, 16, 64, generator=g),
              "labels": torch.randint(3, VOCAB, (BATCH, 32), generator=g)}
    if padded:
        mask = torch.ones(BATCH, 32, dtype=torch.long)
        mask[1, 24:] = 0
        mask[3, 20:] = 0
        inputs["decoder_attention_mask"] = mask
    return model, inputs


def measure(model, module, inputs) -> int:
    """Absolute peak of one step of ``module`` (which trains ``model``)."""
    static = storage_bytes(list(model.parameters()) + list(model.buffers()) + list(inputs.values()))

    def step():
        torch.manual_seed(0)
        out = module(**inputs)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        return loss.detach()

    step()  # compile, warm up
    for p in model.parameters():
        p.grad = None
    gc.collect()
    delta, _ = measure_peak(step)
    for p in model.parameters():
        p.grad = None
    return static + delta


def eager_saved_bytes(model, inputs) -> int:
    """Bytes of the distinct storages eager autograd saves for backward (not
    parameters or inputs)."""
    tensors = list(model.parameters()) + list(model.buffers()) + [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    static = {t.untyped_storage().data_ptr() for t in tensors}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in static:
            saved[st.data_ptr()] = st.nbytes()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    del out
    return sum(saved.values())


def _compiled_peak(model, inputs, backend: str) -> int:
    """A peer's peak, compiled as one graph (logging calls ignored, as the planner's
    capture does), so that the loss is inside the compiled step as in ours."""
    from profiles._torch_private import allow_recompiles

    allow_recompiles()
    torch._dynamo.reset()
    try:
        return measure(model, torch.compile(model, backend=backend, fullgraph=True), inputs)
    finally:
        torch._dynamo.reset()


def ours(model, inputs, minimum: bool) -> dict:
    """Predicted peaks of the no-checkpoint step before and after arrangement, the
    gap's parts, and (``minimum``) the lowest budgets."""
    joint = capture(model, inputs, dropout="mask")
    gp = profile_graph(joint)
    row = {}
    as_run = profile_as_run(gp, loss="model", blocks=False)  # the loss is inside: no zero tangents
    for label, profile, arranged in (("before", gp, False), ("arranged", gp, True), ("after", as_run, True)):
        prob = dataclasses.replace(build_problem(profile), arrange=arranged)
        row[f"ours_{label}"] = prob.evaluate(frozenset()).sim.peak_bytes
        if minimum and label != "arranged":
            row[f"min_{label}"] = minimum_budget_bytes(prob)
    sched = fast_schedule(joint, frozenset())
    static = set(gp.static_storages)
    saved = {s for n in sched.saved for s in gp.nodes[n].storages if s not in static}
    row["saved"] = sum(gp.storage_bytes[s] for s in saved)
    row["tangent"] = sum(
        gp.storage_bytes[s]
        for n in gp.gm.graph.find_nodes(op="placeholder")
        if n.name.startswith("tangents") and n.meta["val"].numel() > 1
        for s in gp.nodes[n.name].storages
    )
    joint.drop_tensors()
    return row


def run(name: str, minimum: bool) -> dict:
    model, inputs = make(name)
    row = {"model": name, "eager": measure(model, model, inputs)}
    row["saved_eager"] = eager_saved_bytes(model, inputs)
    row["aot_eager"] = _compiled_peak(model, inputs, "aot_eager")
    row["aot_default"] = _compiled_peak(model, inputs, "aot_eager_default_partitioner")
    row.update(ours(model, inputs, minimum))
    plan = planner.plan(copy.deepcopy(model), 100.0, inputs)
    if plan.baseline_peak_bytes != row["ours_after"]:
        raise AssertionError(f"{name}: plan() predicts {plan.baseline_peak_bytes}, the arranged problem {row['ours_after']}")
    torch._dynamo.reset()
    row["ours_measured"] = measure(model, runtime.apply(model, plan), inputs)
    torch._dynamo.reset()
    at_eager = planner.plan(copy.deepcopy(model), row["eager"] / 2**30, inputs)
    row["recomputed_at_eager"] = len(at_eager.recomputed)
    row["recompute_time_at_eager"] = at_eager.recompute_time_s / at_eager.step_time_s if at_eager.step_time_s else 0.0
    return row


def table(rows: list[dict]) -> str:
    def rel(x, e):
        return f"{x / MiB:.2f} ({x / e - 1:+.1%})"

    head = ("| model | eager MiB | aot_eager (min-cut) | aot_eager default partition | ours before | ours arranged "
            "| ours as run (measured) | measured - eager (B) | zero tangents | saved - eager's saved "
            "| recomputed at budget = eager (time) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        e = r["eager"]
        lines.append(
            f"| {r['model']} | {e / MiB:.2f} | {rel(r['aot_eager'], e)} | {rel(r['aot_default'], e)} | "
            f"{rel(r['ours_before'], e)} | {rel(r['ours_arranged'], e)} | {rel(r['ours_after'], e)} ({r['ours_measured'] / MiB:.2f}) | "
            f"{r['ours_measured'] - e:+,} | {r['tangent'] / MiB:.2f} | {(r['saved'] - r['saved_eager']) / MiB:+.2f} | "
            f"{r['recomputed_at_eager']} ({r.get('recompute_time_at_eager', 0.0):.2%}) |"
        )
    if any("min_before" in r for r in rows):
        lines += ["", "| model | minimum budget before (x eager) | after (x eager) |", "|---|---|---|"]
        for r in rows:
            if "min_before" in r:
                lines.append(f"| {r['model']} | {r['min_before'] / r['eager']:.3f} | {r['min_after'] / r['eager']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mistral,qwen2,gemma,gpt_neox,phi3,opt,mamba,mamba_loop,gpt2,bench_gpt2,bench_resnet")
    ap.add_argument("--minimum", action="store_true", help="also search the minimum budget before and after (slow)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        rows.append(run(name, args.minimum))
        print(table(rows[-1:]).splitlines()[2], flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
