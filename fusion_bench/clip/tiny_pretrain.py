"""Contrastive pretraining of the tiny CLIP on generated image-caption pairs (`make tiny-pretrain`).

Deterministic: the same seed and thread count give the same weights. Writes fusion_bench/assets/tiny_clip.safetensors
(fp16). `--world` picks the caption world (fusion_bench/data/caption_worlds.py; the committed model: `shapes`).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from rich.progress import track

from fusion_bench.clip.model import TINY_CHECKPOINT, create_clip, image_norm
from fusion_bench.data.caption_worlds import world
from fusion_bench.data.tiny_eight import to_tensor
from fusion_bench.store import atomic_save_safetensors


def make_pairs(n: int, seed: int, world_name: str = "shapes"):
    rng = np.random.default_rng(seed)
    sample = world(world_name)
    imgs, caps = zip(*(sample(rng) for _ in range(n)))
    return np.stack(imgs), list(caps)


def pretrain(steps: int = 1500, batch_size: int = 128, n_pairs: int = 20000, lr: float = 1e-3, seed: int = 0,
             world_name: str = "shapes"):
    torch.manual_seed(seed)
    model = create_clip("tiny-clip")
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    images, texts = make_pairs(n_pairs, seed, world_name)
    x_all = to_tensor(images, *image_norm(model))
    t_all = tokenizer(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
    )
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in track(range(steps), description="pretraining tiny CLIP"):
        idx = torch.randint(0, n_pairs, (batch_size,), generator=gen)
        img_f = model.encode_image(x_all[idx], normalize=True)
        txt_f = model.encode_text(t_all[idx], normalize=True)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  logit_scale {model.logit_scale.exp().item():.1f}")
    return model, float(loss.item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=20000, help="image-caption pairs generated")
    p.add_argument("--world", default="shapes", help="caption world: shapes | all_words | synonyms")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(TINY_CHECKPOINT))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, loss = pretrain(steps=args.steps, batch_size=args.batch_size, n_pairs=args.pairs, seed=args.seed,
                           world_name=args.world)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    meta = {"steps": str(args.steps), "batch_size": str(args.batch_size), "seed": str(args.seed), "final_loss": f"{loss:.4f}"}
    if args.world != "shapes" or args.pairs != 20000:  # the committed asset's metadata stays as it was
        meta.update(world=args.world, pairs=str(args.pairs))
    atomic_save_safetensors(state, args.out, metadata=meta)
    print(json.dumps({**meta, "seconds": round(time.time() - t0, 1), "out": args.out}))


if __name__ == "__main__":
    main()
