"""Twelve small Hugging Face architectures, loss inside the model: the plan against eager, exact and within budget.

Each model is random-init (2 layers, hidden 64, vocabulary 500, batch 2 x 32 tokens;
ViT 8 images of 64 x 64) and computes its loss from ``labels``; the loop is
``out = wrapped(**inputs); out.loss.backward()``. For each: eager's measured peak;
the plan with nothing recomputed and the plan at ``--fraction`` of eager's
activations (static bytes plus that share of the rest), each applied with
``runtime.apply`` and measured (``bench_eager_gap.measure``: allocator events plus
parameters, buffers and inputs), its largest gradient difference from eager's,
and the values it recomputes.

    python bench/bench_hf_zoo.py [--models bert_mlm,t5,...] [--fraction 0.8]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from bench_eager_gap import measure  # noqa: E402

VOCAB = 500


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(seed))


def make(name: str):
    """A random-init model and its inputs (``labels`` included)."""
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB)
    text = {"input_ids": _ids(), "labels": _ids(2)}
    seq2seq = {"input_ids": _ids(), "labels": _ids(3)}
    causal = {"input_ids": _ids(), "labels": _ids()}
    zoo = {
        "bert_mlm": lambda: (T.BertForMaskedLM(T.BertConfig(**small)), text),
        "bert_cls": lambda: (T.BertForSequenceClassification(T.BertConfig(**small, num_labels=3)),
                             {"input_ids": _ids(), "labels": torch.tensor([0, 2])}),
        "roberta": lambda: (T.RobertaForMaskedLM(T.RobertaConfig(**small, max_position_embeddings=64)), text),
        "distilbert": lambda: (T.DistilBertForMaskedLM(T.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4,
                                                                          hidden_dim=128)), text),
        "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2, use_cache=False)), causal),
        "gpt2_use_cache": lambda: (T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                                                  n_positions=64)), {**causal, "use_cache": True}),
        "t5": lambda: (T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                               num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                                               decoder_start_token_id=0, pad_token_id=0)), seq2seq),
        "bart": lambda: (T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0)),
            seq2seq),
        "electra": lambda: (T.ElectraForMaskedLM(T.ElectraConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4,
                                                                 intermediate_size=128)), text),
        "albert": lambda: (T.AlbertForMaskedLM(T.AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              intermediate_size=128)), text),
        "gpt_neo": lambda: (T.GPTNeoForCausalLM(T.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                                               attention_types=[[["global", "local"], 1]],
                                                               max_position_embeddings=64, use_cache=False)), causal),
        "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                                intermediate_size=128, image_size=64, patch_size=8,
                                                                num_labels=5)),
                        {"pixel_values": torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
                         "labels": torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))}),
    }
    model, inputs = zoo[name]()
    return model.train(), inputs


def _applied(model, inputs, p) -> tuple[int, float]:
    """(measured peak, largest gradient difference from eager's) of ``p`` applied to a copy of ``model``."""
    eager, planned = copy.deepcopy(model), copy.deepcopy(model)
    wrapped = runtime.apply(planned, p)
    for m in (eager, wrapped):
        torch.manual_seed(0)
        m(**inputs).loss.backward()
    diff = max(((a.grad - b.grad).abs().max().item() for a, b in zip(eager.parameters(), planned.parameters())
                if a.grad is not None), default=0.0)
    return measure(planned, wrapped, inputs), diff


def run(name: str, fraction: float) -> list[str]:
    model, inputs = make(name)
    eager = measure(model, model, inputs)
    full = planner.plan(copy.deepcopy(model), 100.0, inputs)
    budget = full.static_bytes + fraction * (eager - full.static_bytes)
    rows = []
    for label, p in (("nothing recomputed", full),
                     (f"{fraction:.0%} of activations", planner.plan(copy.deepcopy(model), budget / planner.GiB, inputs))):
        measured, diff = _applied(model, inputs, p)
        rows.append(f"| {name} | {label} | {eager:,} | {p.budget_bytes:,} | {p.predicted_peak_bytes:,} | {measured:,} | "
                    f"{measured - eager:+,} | {measured - p.predicted_peak_bytes:+,} | {diff:.1e} | {len(p.recomputed)} |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert_mlm,bert_cls,roberta,distilbert,llama,gpt2_use_cache,t5,bart,electra,albert,"
                                        "gpt_neo,vit")
    ap.add_argument("--fraction", type=float, default=0.8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | plan | eager B | budget B | predicted B | measured B | measured - eager | measured - predicted "
          "| max grad diff vs eager | values recomputed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for row in run(name, args.fraction):
            print(row, flush=True)


if __name__ == "__main__":
    main()
