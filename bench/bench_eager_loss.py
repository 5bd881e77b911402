"""A loss computed eagerly (Wav2Vec2ForCTC's CTC loss), planned: measured peaks against the peers.

Hugging Face's Wav2Vec2ForCTC (random init) breaks the graph in its feature encoder
and, given ``labels``, computes its CTC loss in code ``torch.compile`` runs eagerly
(inside ``torch.backends.cudnn.flags``); the planner measures that loss
(``profiles/eager_loss.py``). Two loops: ``labels`` passed to the model (the loss
inside), and the same CTC loss as a ``loss_fn`` outside it. Peaks of one training
step (CPU allocator events plus parameters, buffers and inputs), for: eager;
``torch.compile`` with ``aot_eager``; Hugging Face's gradient checkpointing of every
layer; and plans at eager's peak, at fractions of eager's activation memory (its
peak less the static bytes) and at the planner's minimum, with their predictions.

    python bench/bench_eager_loss.py [--hidden 64] [--samples 16000] [--fractions 0.8,0.6]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import planner  # noqa: E402
import runtime  # noqa: E402
from profiles import storage_bytes  # noqa: E402
from step_peak import step_peak  # noqa: E402


def make(hidden: int, layers: int) -> nn.Module:
    transformers.logging.set_verbosity_error()
    cfg = transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * hidden,
        conv_dim=(32, 32, 32), conv_stride=(5, 4, 2), conv_kernel=(10, 4, 2), num_feat_extract_layers=3,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, layerdrop=0.0, mask_time_prob=0.0)
    torch.manual_seed(0)
    return transformers.Wav2Vec2ForCTC(cfg).train()


def ctc_loss_fn(labels: torch.Tensor):
    """Hugging Face's CTC loss (``transformers/loss/loss_ctc.py``) on the logits, as a ``loss_fn``."""

    def loss_fn(out):
        logits = out["logits"]
        log_probs = nn.functional.log_softmax(logits, -1, dtype=torch.float32).transpose(0, 1)
        mask = labels >= 0
        lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
        with torch.backends.cudnn.flags(enabled=False):
            return nn.functional.ctc_loss(log_probs, labels.masked_select(mask), lengths, mask.sum(-1))

    return loss_fn


def measure(model: nn.Module, module, inputs: dict, loss_fn) -> int:
    def step():
        torch.manual_seed(0)
        out = module(**inputs)
        loss = out["loss"] if loss_fn is None else loss_fn(out)
        loss.backward()
        return loss.detach()

    return step_peak(model, step, [*model.parameters(), *model.buffers(), *inputs.values()])


def rows_for(model: nn.Module, inputs: dict, loss_fn, fractions: list[float]) -> list:
    static = storage_bytes([*model.parameters(), *model.buffers(), *inputs.values()])
    eager = measure(model, model, inputs, loss_fn)
    rows = [("eager", eager, None)]
    rows.append(("torch.compile aot_eager",
                 measure(model, torch.compile(copy.deepcopy(model), backend="aot_eager"), inputs, loss_fn), None))
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows.append(("every layer checkpointed (HF)", measure(ckpt, ckpt, inputs, loss_fn), None))
    with planner.prepare(model, inputs, loss_fn=loss_fn) as step:
        plans = [("planner at eager's peak", step.plan(eager))]
        for f in fractions:
            plans.append((f"planner at {f:.0%} of eager's activations", step.plan(int(static + f * (eager - static)))))
        try:
            step.plan(static)
        except planner.BudgetTooSmall as e:
            plans.append(("planner at its minimum", step.plan(e.min_budget_bytes)))
    for name, p in plans:
        m = copy.deepcopy(model)
        rows.append((name, measure(m, runtime.apply(m, p), inputs, loss_fn), p))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16000)
    ap.add_argument("--fractions", default="0.8,0.6")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = make(args.hidden, args.layers)
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(2, args.samples, generator=g)
    labels = torch.randint(1, 32, (2, 40), generator=g)
    labels[1, 30:] = -100
    fractions = [float(f) for f in args.fractions.split(",")]
    for title, inputs, loss_fn in (("labels passed to the model (its CTC loss inside, eager)",
                                    {"input_values": audio, "labels": labels}, None),
                                   ("the CTC loss as loss_fn", {"input_values": audio}, ctc_loss_fn(labels))):
        rows = rows_for(model, inputs, loss_fn, fractions)
        print(f"\nWav2Vec2ForCTC (hidden {args.hidden}, {args.layers} layers), audio 2x{args.samples}, labels 2x40: {title}")
        print("| run | measured peak | budget | predicted | measured / predicted | values recomputed |")
        print("|---|---|---|---|---|---|")
        for name, measured, p in rows:
            if p is None:
                print(f"| {name} | {measured:,} | | | | |")
            else:
                print(f"| {name} | {measured:,} | {p.budget_bytes:,} | {p.predicted_peak_bytes:,} | "
                      f"{measured / p.predicted_peak_bytes:.3f} | {len(p.recomputed)} |")


if __name__ == "__main__":
    main()
