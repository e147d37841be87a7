"""The statistics stage: per-task statistics of each fine-tune on its task's training split, computed once and
kept in the checkpoint store next to the fine-tune, for the merges that weigh task vectors by them.

| method.statistics.kind | what                                                        | merge            |
|------------------------|-------------------------------------------------------------|------------------|
| gram                   | input Gram matrix of every linear map (statistics/grams.py) | regmean          |
| gram, norm_scales=true | the Grams and each norm scale's E[x_hat^2] (statistics/grams.py) | lot_merging |
| fisher                 | diagonal Fisher of every merged parameter (statistics/fisher.py) | fisher_merging |
| layer_gram             | Grams of the partial merge, layer by layer (stages/layer_grams.py) | regmean_plusplus |

A statistic's file is `<fine-tune>.stat-<kind>-<hash>.safetensors`, keyed by the fine-tune (its path), the
statistic, the number of samples, the seed, the Fisher's target, norm_scales (when true), the Grams' definition
(`GRAMS_VERSION`, see fusion_bench/statistics/grams.py) and the fine-tuning mode; written atomically,
loaded without pickle, and reused by every later merge and sweep. RegMean++'s layer Grams depend on the merge
itself: nothing is stored, the merge gets a callable that computes them (fusion_bench/stages/layer_grams.py).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

from fusion_bench import keys
from fusion_bench.errors import ConfigError
from fusion_bench.families.base import ModelFamily
from fusion_bench.reporting.memory import release
from fusion_bench.stages import layer_grams
from fusion_bench.stages.finetune import finetuned_state
from fusion_bench.stages.merge import Method
from fusion_bench.statistics.grams import GRAMS_VERSION
from fusion_bench.store import CheckpointError, atomic_save_safetensors, config_hash

log = logging.getLogger(__name__)

KINDS = {"gram": "grams", "fisher": "fishers", "layer_gram": "layer_grams"}  # statistic -> the function's argument


def spec(method: Method) -> dict | None:
    """The method's `statistics:` block with its defaults, or None for a method that needs none."""
    s = method.cfg.get("statistics")
    if not s:
        return None
    s = {"num_samples": 256, "batch_size": 16, "seed": 0, "target": "sample", **keys.resolved(s)}
    if s.get("kind") not in KINDS:
        raise ConfigError(f"method={method.name}: statistics.kind={s.get('kind')!r}; expected one of {sorted(KINDS)}")
    takes = inspect.signature(method.func).parameters
    if KINDS[s["kind"]] not in takes:  # e.g. regmean's Grams handed to RegMean++, which needs them layer by layer
        wants = [k for k, arg in KINDS.items() if arg in takes]
        raise ConfigError(f"method={method.name}: statistics.kind={s['kind']!r} is not what it merges with; use "
                          f"statistics.kind={wants[0] if wants else None!r}")
    if s.get("norm_scales") and s["kind"] != "gram":
        raise ConfigError(f"method={method.name}: statistics.norm_scales=true goes with kind=gram, not {s['kind']!r}")
    return s


def check(fam: ModelFamily, method: Method, tasks: list[str]) -> None:
    """Stop before any work when the statistics cannot be had: the mode, the target or a task's train split."""
    s = spec(method)
    if s is None:
        return
    what = {"gram": "input Gram matrices of the encoder's linear maps", "fisher": "the Fisher of its weights",
            "layer_gram": "input Gram matrices of the partial merge's linear maps"}
    if not fam.merges_plain_weights:
        raise ConfigError(f"method={method.name} needs {what[s['kind']]}, but finetune={fam.mode} merges "
                          f"{'LoRA adapters' if fam.merges_adapters else 'a linearized model'}, for which there are none: "
                          f"use finetune=standard, attention, linear_layers or lora")
    if s["kind"] == "fisher" and s["target"] not in fam.fisher_targets:
        raise ConfigError(f"method={method.name}: statistics.target={s['target']!r} is not available for "
                          f"model={fam.cfg.model.name}; use one of {list(fam.fisher_targets)}")
    if s["kind"] == "layer_gram":
        layer_grams.check(fam, f"method={method.name}")
    fam.require_split(tasks, "train", f"method={method.name} ({what[s['kind']]})")


def path(fam: ModelFamily, task: str, s: dict) -> Path:
    fields = {k: s[k] for k in ("kind", "num_samples", "seed")}
    if s["kind"] == "fisher":
        fields["target"] = s["target"]
    if s["kind"] == "gram":  # Grams of another definition (per sample, padding counted) are never reused
        fields["gram_version"] = GRAMS_VERSION
        if s.get("norm_scales"):  # the Grams with the norm scales' moments (LOT Merging): a file of its own
            fields["norm_scales"] = True
    h = config_hash({**fields, "finetune": keys.finetune_options(fam.mode_cfg)})
    return fam.checkpoint(task).with_suffix(f".stat-{s['kind']}-{h}.safetensors")


def task_statistics(fam: ModelFamily, method: Method, tasks: list[str]) -> dict[str, list] | None:
    """{argument name: one statistic per task} for the method's call, each made once and then read back."""
    s = spec(method)
    if s is None:
        return None
    if s["kind"] == "layer_gram":  # computed during the merge, from the partial merge (stages/layer_grams.py)
        return {KINDS[s["kind"]]: layer_grams.layer_grams(fam, tasks, s)}
    stats = []
    for t in tasks:
        stats.append(ensure(fam, t, s))
        release()  # the model and the passes that made it: the next task's peak starts from the statistics alone
    return {KINDS[s["kind"]]: stats}


def ensure(fam: ModelFamily, task: str, s: dict) -> Mapping[str, torch.Tensor]:
    where = path(fam, task, s)
    merge_keys = set(fam.pretrained_state)
    if where.is_file():
        log.info("reusing %s statistics of %s: %s", s["kind"], task, where)
        return _open(fam, where, merge_keys)
    t0 = time.perf_counter()
    device = fam.eval_where["device"]
    model = fam.model_with(finetuned_state(fam, task)).to(device)
    batches = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x,
                       fam.batches(task, "train", int(s["num_samples"]), int(s["seed"]), int(s["batch_size"])))
    n = sum(len(b[1]) for b in batches)
    if s["kind"] == "gram":
        extra = {"norm_scales": True} if s.get("norm_scales") else {}
        stat = {k: v for k, v in fam.grams(model, batches, **extra).items() if k in merge_keys}
    else:
        names = [k for k in fam.pretrained_state if fam.pretrained_state[k].is_floating_point()]
        stat = fam.fisher(model, task, batches, s["target"], int(s["seed"]), names)
    stat = {k: v.detach().cpu().float() for k, v in stat.items()}
    if not stat:
        raise ValueError(f"no {s['kind']} statistics for any merged parameter of finetune={fam.mode}")
    seconds = time.perf_counter() - t0
    meta = {**{k: str(v) for k, v in s.items()}, "task": task, "samples_used": str(n), "seconds": f"{seconds:.2f}",
            "finetune": json.dumps(keys.resolved(fam.mode_cfg))}
    atomic_save_safetensors(stat, where, metadata=meta)
    log.info("%s statistics of %s (%d samples, %d tensors) in %.1f s -> %s", s["kind"], task, n, len(stat),
             seconds, where)
    del stat, model
    return _open(fam, where, merge_keys)


def _open(fam: ModelFamily, where: Path, merge_keys: set[str]):
    """A stored statistic read tensor by tensor when the merge asks (T tasks' Grams or Fishers are T encoders'
    worth of memory, more for RegMean's c_proj Grams), checked as the store checks fine-tunes: the keys, then
    every tensor once for NaN / Inf."""
    stat = fam.store.open(where)
    unknown = sorted(set(stat) - merge_keys)
    if unknown:
        raise CheckpointError(f"statistic {where} has keys this run does not merge ({unknown[:3]}): delete it "
                              f"and re-run")
    return stat
