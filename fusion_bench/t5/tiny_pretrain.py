"""Pretraining of the tiny T5 on the tiny_glue world (`make tiny-t5-pretrain`, ~2.5 min on one core).

    python -m fusion_bench.t5.tiny_pretrain [--out fusion_bench/assets/tiny_t5] [--steps N] [--seed S]

The model: a T5 v1.1-style T5ForConditionalGeneration (gated-GELU, d_model 64, 2 encoder + 2 decoder layers,
4 heads, 0.3M parameters) with a word-level vocabulary that needs no download: every word of the world
(fusion_bench.data.tiny_glue.WORDS), GLUE's prompt words and label words, the STS-B score texts, single characters
(the fallback for anything else) and `EXTRA_IDS` span sentinels.

What it is trained on (`make_corpus`), all generated from the seed:
- 60%: T5's span corruption (~15% of the tokens in spans of mean length 3, each replaced by a sentinel; the decoder
  writes the spans) of 1-3 plain sentences of the world (`tiny_glue.world_sentence`);
- 30%: questions about the world answered by one of its words (`tiny_glue.world_qa`: where / what colour / who has
  a thing, what a person has, another word for a word, what a retelling changed), as Flan-T5 was trained on other
  prompted tasks: it reads a prompt and answers with a word and EOS;
- 10%: each tiny_glue task's prompt with a label word drawn at random (`tiny_glue.format_example`): it answers each
  prompt with that task's label words, as Flan-T5 knows GLUE's formats, but knows none of the tasks' rules (its
  zero-shot scores are at chance). Without these, a merge of the fine-tunes answers one task's prompt with
  another task's label words and scores 0 everywhere.

Deterministic: the same seed and thread count give the same weights. Writes <out>.safetensors (fp16) and
<out>.json (config, vocabulary, pretraining metadata), what `fusion_bench.t5.model.load_tiny_t5` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fusion_bench.data import glue, tiny_glue
from fusion_bench.t5.model import TINY_T5, decoder_inputs, save_tiny_t5, tiny_tokenizer

EXTRA_IDS = 16
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,?!:;'\"_-()"
CONFIG = {"d_model": 64, "d_kv": 16, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
          "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0,
          "eos_token_id": 1, "relative_attention_num_buckets": 64, "relative_attention_max_distance": 128}


def vocabulary() -> list[tuple[str, float]]:
    """[piece, log-probability]: special tokens, whole words (-1), single characters (-5, the fallback)."""
    prompt_words = [w for spec in glue.TASKS.values() for w in spec.template.split() if "{" not in w]
    targets = [t for spec in glue.TASKS.values() for t in (spec.targets or {}).values()]
    scores = [f"{i / 5:.1f}" for i in range(26)]  # the STS-B targets 0.0, 0.2, ..., 5.0
    words = dict.fromkeys([*tiny_glue.WORDS, *prompt_words, *targets, *scores])
    vocab = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    for w in words:
        vocab.setdefault("\u2581" + w, -1.0)
    for c in CHARS:
        vocab.setdefault(c, -5.0)
        vocab.setdefault("\u2581" + c, -5.0)
    return list(vocab.items())


def span_corrupt(ids: list[int], rng: random.Random, sentinels: list[int], eos: int, density: float = 0.15,
                 mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """(input, target) of T5's span corruption: ~density of the tokens, in spans of mean length mean_span, each
    replaced by the next sentinel in the input; the target lists sentinel, span, sentinel, span, ..."""
    n = len(ids)
    n_noise = max(1, round(n * density))
    n_spans = max(1, min(len(sentinels), round(n_noise / mean_span)))
    starts = sorted(rng.sample(range(n), n_spans))
    noise = [False] * n
    budget = n_noise
    for k, s in enumerate(starts):
        length = max(1, min(budget - (n_spans - k - 1), round(rng.expovariate(1 / mean_span)) or 1))
        for i in range(s, min(n, s + length)):
            noise[i] = True
        budget -= length
    src, tgt, span = [], [], -1
    for i, tok in enumerate(ids):
        if noise[i]:
            if i == 0 or not noise[i - 1]:
                span += 1
                src.append(sentinels[span])
                tgt.append(sentinels[span])
            tgt.append(tok)
        else:
            src.append(tok)
    return src + [eos], tgt + [eos]


def make_corpus(tokenizer, n: int, seed: int, qa: float = 0.3, formats: float = 0.1) -> list[tuple[list[int], list[int]]]:
    """n (input ids, target ids): span corruption of 1-3 world sentences; or (share `qa`) a world question and its
    one-word answer (tiny_glue.world_qa); or (share `formats`) a tiny_glue task's prompt with a random label word
    (tiny_glue.format_example)."""
    rng = random.Random(f"tiny_t5/pretrain/{seed}")
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(EXTRA_IDS)])
    eos = tokenizer.eos_token_id
    out = []
    for _ in range(n):
        u = rng.random()
        if u < qa:
            prompt, answer = tiny_glue.world_qa(rng)
        elif u < qa + formats:
            ex = tiny_glue.format_example(rng)
            prompt, answer = ex.source, ex.target
        else:
            text = " ".join(tiny_glue.world_sentence(rng) for _ in range(rng.randint(1, 3)))
            out.append(span_corrupt(tokenizer(text, add_special_tokens=False).input_ids, rng, sentinels, eos))
            continue
        out.append((tokenizer(prompt).input_ids, tokenizer(answer).input_ids))
    return out


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def pretrain(steps: int = 1500, batch_size: int = 48, n_examples: int = 40000, lr: float = 3e-3, seed: int = 0,
             log_every: int = 200):
    """(model, tokenizer, config, vocab, final loss) after `steps` AdamW steps (cosine, 5% warmup)."""
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = vocabulary()
    tokenizer = tiny_tokenizer(vocab, EXTRA_IDS)
    config = {**CONFIG, "vocab_size": len(tokenizer)}
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**config)).float().train()
    corpus = make_corpus(tokenizer, n_examples, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = [corpus[i] for i in torch.randint(0, len(corpus), (batch_size,), generator=gen).tolist()]
        src = _pad([b[0] for b in batch], config["pad_token_id"])
        labels = _pad([b[1] for b in batch], -100)
        logits = model(input_ids=src, attention_mask=(src != config["pad_token_id"]).long(),
                       decoder_input_ids=decoder_inputs(labels, config["decoder_start_token_id"],
                                                        config["pad_token_id"]), use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return model.eval(), tokenizer, config, vocab, float(loss.item())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--examples", type=int, default=40000, help="corrupted examples generated")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1: a model this small only waits on a second thread")
    p.add_argument("--out", default=str(TINY_T5.with_suffix("")),
                   help="writes OUT.safetensors and OUT.json (default: the committed asset)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, _, config, vocab, loss = pretrain(args.steps, args.batch_size, args.examples, args.lr, args.seed)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "examples": args.examples, "lr": args.lr,
            "seed": args.seed, "final_loss": round(loss, 4)}
    out = Path(args.out)
    out = out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
    save_tiny_t5(model, config, vocab, EXTRA_IDS, out, meta)
    summary = {**meta, "seconds": round(time.time() - t0, 1), "out": str(out)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
