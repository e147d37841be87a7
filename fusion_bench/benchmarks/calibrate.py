"""Calibration probe for the tiny benchmark (`make bench-calibrate`, README "Calibrating the tiny benchmark").

One process fine-tunes the tiny CLIP on the eight tiny_eight tasks with a plain AdamW loop (by default the recipe of
`conf/model/tiny_clip.yaml`: cosine schedule with warmup, frozen zero-shot heads; its own batch order, so its
figures are close to, not equal to, `python run.py`'s), then reports zero-shot, individual, weight averaging,
task arithmetic and TIES (coefficients on val over 0.00..1.00, TIES also over 0.0..2.0), ||tau|| / ||theta_0||
and the mean cosine between task vectors. Fine-tunes are cached in --cache by recipe, so a rerun only re-merges.

    python -m fusion_bench.benchmarks.calibrate --lr 1e-3     # the recipe of conf/model/tiny_clip.yaml, but lr 1e-3
    python -m fusion_bench.clip.tiny_pretrain --world synonyms --steps 2000 --pairs 40000 --threads 1 --out W.safetensors
    python -m fusion_bench.benchmarks.calibrate --pretrained W.safetensors --lr 3e-4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from rich.progress import Progress
from safetensors.torch import load_file

from fusion_bench.clip.model import (
    TINY_CHECKPOINT,
    _QuietRandomInit,
    create_clip,
    head_logits,
    image_norm,
    zero_shot_head,
)
from fusion_bench.data import tiny_eight
from fusion_bench.finetune.schedule import cosine_with_warmup
from fusion_bench.merging.ties import ties_merging
from fusion_bench.models.modes import block_weight_names
from fusion_bench.store import atomic_write

GRID = [round(0.05 * i, 2) for i in range(21)]
WIDE_GRID = [round(0.1 * i, 1) for i in range(21)]
MODES = ("standard", "attention")


class Probe:
    def __init__(self, pretrained: Path, tasks: list[str]):
        with _QuietRandomInit():  # the weights are loaded right below
            model = create_clip("tiny-clip")
        model.load_state_dict({k: v.float() for k, v in load_file(pretrained).items()}, strict=False)
        model.eval()
        tok = open_clip.get_tokenizer("tiny-clip")
        mean, std = image_norm(model)
        self.tasks, self.encoder = tasks, model.visual
        self.data = {t: {s: tiny_eight.make_split(t, s) for s in tiny_eight.SPLITS} for t in tasks}
        self.data = {t: {s: (tiny_eight.to_tensor(x, mean, std), torch.from_numpy(y)) for s, (x, y) in d.items()}
                     for t, d in self.data.items()}
        spec = tiny_eight.TASKS
        self.heads = {t: zero_shot_head(model, tok, spec[t].classnames, spec[t].templates) for t in tasks}
        self.theta0 = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    @torch.no_grad()
    def acc(self, state: dict, task: str, split: str) -> float:
        self.encoder.load_state_dict(state)
        x, y = self.data[task][split]
        hits = sum((head_logits(self.encoder(x[i : i + 500]), self.heads[task]).argmax(-1) == y[i : i + 500]).sum()
                   .item() for i in range(0, len(y), 500))
        return 100.0 * hits / len(y)

    def finetune(self, task: str, a, progress: Progress | None = None) -> dict:
        enc = self.encoder
        enc.load_state_dict(self.theta0)
        # finetune=attention: the blocks' attention in/out projection weights, as models/modes.py picks them
        chosen = None if a.mode == "standard" else set(block_weight_names(enc, mlp=False, bias=False))
        params = [p.requires_grad_(chosen is None or n in chosen) for n, p in enc.named_parameters()]
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=a.lr, weight_decay=a.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(a.warmup, a.steps))
        x, y = self.data[task]["train"]
        gen = torch.Generator().manual_seed(a.seed * 1000 + self.tasks.index(task))
        perm, pos = torch.randperm(len(y), generator=gen), 0
        enc.train()
        bar = progress.add_task(f"fine-tune {task}", total=a.steps) if progress else None
        for _ in range(a.steps):
            if pos + a.batch_size > len(y):
                perm, pos = torch.randperm(len(y), generator=gen), 0
            idx = perm[pos : pos + a.batch_size]
            pos += a.batch_size
            loss = F.cross_entropy(head_logits(enc(x[idx]), self.heads[task]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                progress.advance(bar)
        enc.eval()
        return {k: v.detach().clone() for k, v in enc.state_dict().items()}


def _mean(d: dict) -> float:
    return float(np.mean(list(d.values())))


def main() -> None:
    train = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny_clip.yaml").train
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", type=Path, default=TINY_CHECKPOINT)
    p.add_argument("--lr", type=float, default=float(train.lr), help="default: conf/model/tiny_clip.yaml")
    p.add_argument("--weight-decay", type=float, default=float(train.weight_decay))
    p.add_argument("--steps", type=int, default=int(train.steps))
    p.add_argument("--warmup", type=int, default=int(train.warmup_steps))
    p.add_argument("--batch-size", type=int, default=int(train.batch_size))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="standard", choices=MODES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("outputs/calibrate"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tasks = list(tiny_eight.TASKS)
    print(f"calibration probe ({a.mode}, lr {a.lr:g}, {a.steps} steps): building the tiny_eight tasks ...", flush=True)
    probe = Probe(a.pretrained, tasks)
    recipe = {k: str(v) for k, v in vars(a).items() if k not in ("json", "threads", "cache")}
    recipe["pretrained_bytes"] = hashlib.md5(a.pretrained.read_bytes()).hexdigest()
    cache = a.cache / f"finetunes-{hashlib.md5(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]}.pt"
    t0 = time.perf_counter()
    if cache.is_file():
        print(f"fine-tunes of this recipe: {cache}", flush=True)
        fts = torch.load(cache, weights_only=True)
    else:
        with Progress(transient=True) as progress:
            fts = [probe.finetune(t, a, progress) for t in tasks]
        atomic_write(cache, lambda tmp: torch.save(fts, tmp))
    seconds = time.perf_counter() - t0
    theta0 = probe.theta0
    print("evaluating zero-shot, individual and the merges on val (coefficients) and test ...", flush=True)
    ind = {s: {t: probe.acc(fts[i], t, s) for i, t in enumerate(tasks)} for s in ("val", "test")}

    def evaluate(state, split):
        return {t: probe.acc(state, t, split) for t in tasks}

    def normalized(accs, split):
        return float(np.mean([accs[t] / max(ind[split][t], 1e-9) for t in tasks]))

    def searched(build, grid):
        _, neg = max((normalized(evaluate(build(c), "val"), "val"), -c) for c in grid)  # a tie: the smaller c
        test = evaluate(build(-neg), "test")
        return {"coef": -neg, "test": _mean(test), "normalized": normalized(test, "test"), "per_task": test}

    keys = [k for k in theta0 if theta0[k].is_floating_point()]
    taus = [{k: ft[k] - theta0[k] for k in keys} for ft in fts]
    tau_sum = {k: sum(tv[k] for tv in taus) for k in keys}

    def ta(c):
        return {**theta0, **{k: theta0[k] + c * tau_sum[k] for k in keys}}

    def ties(c):
        return ties_merging(theta0, fts, k=0.2, scaling_coef=c)

    flat = F.normalize(torch.stack([torch.cat([tv[k].flatten() for k in keys]) for tv in taus]), dim=1)
    cos = flat @ flat.T
    n0 = math.sqrt(sum(theta0[k].pow(2).sum().item() for k in keys))
    wa = evaluate(ta(1.0 / len(tasks)), "test")
    out = {
        "recipe": recipe, "finetune_seconds": round(seconds, 1),
        "zero_shot": evaluate(theta0, "test"), "individual": ind["test"],
        "tau_relative_norm": [round(math.sqrt(sum(tv[k].pow(2).sum().item() for k in keys)) / n0, 4) for tv in taus],
        "mean_cosine": float((cos.sum() - cos.diag().sum()) / (len(tasks) * (len(tasks) - 1))),
        "weight_average": {"test": _mean(wa), "normalized": normalized(wa, "test"), "per_task": wa},
        "task_arithmetic": searched(ta, GRID), "ties": searched(ties, GRID), "ties_0_2": searched(ties, WIDE_GRID),
    }
    merges = [f"{m} {out[m]['test']:.1f} ({out[m]['normalized']:.3f})" + (f" @{out[m]['coef']}" if "coef" in out[m]
                                                                         else "")
              for m in ("weight_average", "task_arithmetic", "ties", "ties_0_2")]
    print(f"zero-shot {_mean(out['zero_shot']):.1f}  individual {_mean(out['individual']):.1f}  "
          f"||tau||/||theta0|| {np.mean(out['tau_relative_norm']):.3f}  | " + "  ".join(merges))
    if a.json:
        atomic_write(a.json, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))


if __name__ == "__main__":
    main()
