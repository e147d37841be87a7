"""Coefficient learning (`coefficients=adamerging|adarank|lorahub`): the coefficients of a weighted merge learnt from
data, beside the grid search on val (`coefficients=grid`, the default; fusion_bench/stages/coefficients/grid.py).

- adamerging (Yang et al., ICLR 2024): per task (`layer_wise: false`) or per task and parameter tensor, by
  minimising the entropy of each task's predictions on unlabelled inputs (the test split's, as the paper does;
  `split: val` as an option). Over task arithmetic's task vectors = AdaMerging; over TIES-trimmed,
  sign-resolved ones (`method=ties`) = AdaMerging++.
- adarank (Lee et al., ICLR 2026): per task and masked key, a mask over the task vector's singular components,
  learnt with AdaMerging's layer-wise coefficients by the same entropy minimisation (straight-through masks), over
  task arithmetic (`method=adarank`) or CART (`method=adarank_cart`); it starts at the base merge as configured
  (method.scaling_coef, CART's rank_ratio); see fusion_bench/merging/adarank.py.
- lorahub (Huang et al., 2023): one weight per LoRA fine-tune, searched gradient-free on a few labelled val
  examples per task; A and B combined separately, key by key, around an origin at which the model is the
  pretrained one (w = 0): the zero adapter for zero-B inits (the reference's sum_t w_t phi_t), the shared init
  phi_0 for finetune.init=compensated (phi_0 + sum_t w_t (phi_t - phi_0)); see fusion_bench/merging/lorahub.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils._pytree import tree_map

from fusion_bench.errors import ConfigError
from fusion_bench.families.base import ModelFamily
from fusion_bench.merging.adamerging import adamerging, ties_task_vectors
from fusion_bench.merging.adarank import BASES as ADARANK_BASES
from fusion_bench.merging.adarank import adarank, masked_keys, prepare_adarank
from fusion_bench.merging.lorahub import lorahub, lorahub_origin
from fusion_bench.reporting import plots
from fusion_bench.stages.merge import Method

log = logging.getLogger(__name__)

WEIGHTED = ("task_arithmetic", "ties_merging")  # methods whose merge is a weighted sum of task vectors

# The settings of each strategy's block live with the run's other ranges: fusion_bench/validation/options.py.


def check(fam: ModelFamily, method: Method, coef_cfg: DictConfig, tasks: list[str]) -> None:
    """Stop before any work when the strategy cannot run here, naming the method, the mode and what is missing."""
    strategy = coef_cfg.strategy
    if strategy == "grid":
        return
    if method.cfg.get("statistics"):
        raise ConfigError(f"coefficients={strategy} learns the coefficients of a weighted merge; method="
                          f"{method.name} weighs by statistics instead: use coefficients=grid")
    if strategy == "adamerging":
        if method.func.__name__ not in WEIGHTED:
            raise ConfigError(f"coefficients=adamerging learns coefficients of task_arithmetic (AdaMerging) or ties "
                              f"(AdaMerging++) task vectors, not of method={method.name}")
        _runs_merged_weights(fam, strategy)
    elif strategy == "adarank":
        if method.func.__name__ not in ADARANK_BASES:
            raise ConfigError(f"coefficients=adarank masks the singular components of task_arithmetic (method=adarank) "
                              f"or cart (method=adarank_cart) task vectors, not of method={method.name}")
        _runs_merged_weights(fam, strategy)
        _adarank_start(method, coef_cfg, tasks)
        keys = str(coef_cfg.get("keys", "official"))  # (DictConfig.keys is a method)
        if method.func.__name__ == "cart" and str(method.cfg.get("keys", "official")) != keys:
            raise ConfigError(f"coefficients.keys={keys} masks other keys than CART truncates (method.keys="
                              f"{method.cfg.get('keys', 'official')}): give both the same keys")
        try:
            masked_keys(fam.pretrained_state, keys)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    elif strategy == "lorahub":
        if not fam.merges_adapters:
            raise ConfigError(f"coefficients=lorahub combines LoRA adapters: use finetune=l_lora, or finetune=lora "
                              f"finetune.task_vector=adapters (got finetune={fam.mode})")
        _needs(fam, "loss", strategy)
    else:
        raise ConfigError(f"coefficients.strategy={strategy!r}; expected grid, adamerging, adarank or lorahub")
    fam.require_split(tasks, coef_cfg.get("split", "val"), f"coefficients={strategy} (inputs to learn from)")


def _needs(fam: ModelFamily, what: str, strategy: str) -> None:
    """The family must give `what` (a differentiable classifier, a loss) for the strategy."""
    if getattr(type(fam), what) is getattr(ModelFamily, what):
        raise ConfigError(f"coefficients={strategy} is not available for model={fam.cfg.model.name} "
                          f"({type(fam).__name__} has no `{what}`)")


def learn(fam: ModelFamily, method: Method, coef_cfg: DictConfig, finetuned: list[dict], tasks: list[str],
          run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The merge at the learnt coefficients, and what the report records of them."""
    if coef_cfg.strategy == "adamerging":
        return _adamerging(fam, method, coef_cfg, finetuned, tasks, run_dir)
    if coef_cfg.strategy == "adarank":
        return _adarank(fam, method, coef_cfg, finetuned, tasks, run_dir)
    return _lorahub(fam, coef_cfg, finetuned, tasks)


def _task_vectors(fam: ModelFamily, method: Method, finetuned: list[dict]) -> list[dict[str, torch.Tensor]]:
    pre = fam.pretrained_state
    if method.func.__name__ == "ties_merging":
        return ties_task_vectors(pre, finetuned, k=float(method.cfg.get("k", 0.2)))
    return [{k: ft[k].float() - v.float() for k, v in pre.items() if v.is_floating_point()} for ft in finetuned]


def _adamerging(fam, method, c, finetuned, tasks, run_dir):
    device = fam.eval_where["device"]
    pre = {k: v.to(device) for k, v in fam.pretrained_state.items()}
    tvs = [{k: v.to(device) for k, v in tv.items()} for tv in _task_vectors(fam, method, finetuned)]
    float_keys = [k for k in pre if pre[k].is_floating_point()]
    pre32 = {k: pre[k].float() if k in float_keys else pre[k] for k in pre}
    encoder = fam.model_with(fam.pretrained_state).to(device)
    split, bs = str(c.get("split", "test")), int(c.batch_size)
    streams = [_Stream(fam, t, split, bs, int(c.seed) + i, device) for i, t in enumerate(tasks)]
    res = adamerging(pre32, tvs, lambda w, t, x: fam.logits_at(encoder, w, tasks[t], x),
                     lambda step, t: streams[t].next(), layer_wise=bool(c.layer_wise), steps=int(c.steps),
                     lr=float(c.lr), init=float(c.init), keys=float_keys, progress=True,
                     batches_per_task=int(c.get("batches_per_task", 2)),
                     clamp_in_forward=bool(c.get("clamp_in_forward", True)))
    merged = {k: v.cpu() for k, v in res.weights(pre, tvs).items()}
    coefs = res.coefs.tolist()
    if res.layer_wise:
        plots.curves(list(range(len(res.keys))), dict(zip(tasks, coefs)),
                     f"AdaMerging coefficients ({method.name}, finetune={fam.mode})",
                     "parameter tensor (encoder order)", "learnt coefficient", run_dir / "coefficients.png")
    info = {"strategy": "adamerging", "inputs": f"{split} split, no labels", "layer_wise": res.layer_wise,
            "steps": int(c.steps), "batches_per_task": int(c.get("batches_per_task", 2)),
            "entropy_first": res.entropy[0] if res.entropy else None,
            "entropy_last": res.entropy[-1] if res.entropy else None, "keys": res.keys if res.layer_wise else None,
            "coefficients": dict(zip(tasks, coefs))}
    return merged, info


def _runs_merged_weights(fam: ModelFamily, strategy: str) -> None:
    """AdaMerging and AdaRank differentiate the encoder at merged plain weights (the family's logits_at)."""
    if not fam.merges_plain_weights:
        raise ConfigError(f"coefficients={strategy} runs the encoder at merged weights, but finetune={fam.mode} merges "
                          f"{'LoRA adapters' if fam.merges_adapters else 'a linearized model'}: use "
                          f"finetune=standard, attention, linear_layers or lora (task_vector=delta_w)")
    _needs(fam, "logits_at", strategy)


def _adarank_start(method: Method, c: DictConfig, tasks: list[str]) -> tuple[float | list[float], float]:
    """Where AdaRank starts: (lambda, the share of components kept). The base merge as configured unless the block
    says otherwise: lambda = method.scaling_coef (coefficients.init), kept = CART's rank_ratio or all for task
    arithmetic (coefficients.initial_rank_ratio)."""
    init = c.get("init")
    if init is None:
        init = method.cfg.get("scaling_coef")
        if init is None or isinstance(init, str):
            raise ConfigError(f"coefficients=adarank starts lambda at method.scaling_coef, which is {init!r}: give a "
                              f"number (the official start: 0.3 over task_arithmetic, 2.3 over cart) or set "
                              f"coefficients.init")
        where = "method.scaling_coef"
    else:
        where = "coefficients.init"
    if not isinstance(init, (int, float)):
        init = [float(v) for v in init]
        if len(init) != len(tasks):
            raise ConfigError(f"{where} has {len(init)} values for {len(tasks)} tasks: give one number, or one per task")
    ratio = c.get("initial_rank_ratio")
    if ratio is None:
        ratio = float(method.cfg.get("rank_ratio", 0.12)) if method.func.__name__ == "cart" else 1.0
    return init, float(ratio)


def _adarank(fam, method, c, finetuned, tasks, run_dir):
    device = fam.eval_where["device"]
    init, ratio = _adarank_start(method, c, tasks)
    base = method.func.__name__
    inp = prepare_adarank(fam.pretrained_state, finetuned, base=base, keys=str(c.get("keys", "official")),
                          device=device)
    encoder = fam.model_with(fam.pretrained_state).to(device)
    split, bs = str(c.get("split", "test")), int(c.batch_size)
    streams = [_Stream(fam, t, split, bs, int(c.seed) + i, device) for i, t in enumerate(tasks)]
    res = adarank(inp, lambda w, t, x: fam.logits_at(encoder, w, tasks[t], x), lambda step, t: streams[t].next(),
                  init=init, initial_rank_ratio=ratio, steps=int(c.steps), lr=float(c.lr),
                  mask_temp=float(c.mask_temp), mask_init=float(c.mask_init), learn_coefs=bool(c.learn_coefs),
                  batches_per_task=int(c.batches_per_task), progress=True)
    merged = {k: v.cpu() for k, v in res.weights(inp).items()}
    kept = res.kept()
    ranks = {k: inp.rank(k) for k in inp.masked}
    coefs = res.coefs.tolist()
    x = list(range(len(ranks)))
    plots.curves(x, {t: [kept[i][k] / ranks[k] for k in ranks] for i, t in enumerate(tasks)},
                 f"AdaRank: share of singular components kept ({method.name}, finetune={fam.mode})",
                 "masked key (encoder order)", "kept / rank", run_dir / "ranks.png")
    plots.curves(list(range(len(res.keys))), dict(zip(tasks, coefs)),
                 f"AdaRank coefficients ({method.name}, finetune={fam.mode})", "parameter tensor (encoder order)",
                 "learnt coefficient", run_dir / "coefficients.png")
    info = {"strategy": "adarank", "inputs": f"{split} split, no labels", "base": base, "layer_wise": True,
            "steps": int(c.steps), "batches_per_task": int(c.batches_per_task), "learn_coefs": bool(c.learn_coefs),
            "init": init, "initial_rank_ratio": ratio,
            "entropy_first": res.entropy[0] if res.entropy else None,
            "entropy_last": res.entropy[-1] if res.entropy else None, "keys": res.keys,
            "coefficients": dict(zip(tasks, coefs)), "masked_keys": list(ranks), "rank": ranks,
            "kept": dict(zip(tasks, kept)),
            "kept_fraction": {t: sum(d.values()) / max(1, sum(ranks.values())) for t, d in zip(tasks, kept)}}
    return merged, info


class _Stream:
    """Batches of one task's inputs (no labels), each sample once per pass, passes in a seeded order."""

    def __init__(self, fam: ModelFamily, task: str, split: str, batch_size: int, seed: int, device):
        self.data = fam.tasks[task].split(split)
        self.bs, self.device, self.g = batch_size, device, torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> torch.Tensor:
        while len(self.order) < self.bs:
            self.order += torch.randperm(len(self.data), generator=self.g).tolist()
        idx, self.order = self.order[:self.bs], self.order[self.bs:]
        return torch.stack([torch.as_tensor(self.data[i][0]) for i in idx]).to(self.device)


def _lorahub(fam, c, finetuned, tasks):
    device = fam.eval_where["device"]
    n = int(c.examples_per_task)
    examples = {t: tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x,
                            fam.batches(t, "val", n, int(c.seed), n)[0]) for t in tasks}

    @torch.no_grad()
    def loss(adapters: dict[str, torch.Tensor]) -> float:
        model = fam.model_with(adapters).to(device)
        return sum(float(fam.loss(model, t, examples[t])) for t in tasks) / len(tasks)

    origin = lorahub_origin(fam.pretrained_state)  # w = 0 is the pretrained model for every LoRA init
    res = lorahub(finetuned, loss, origin=origin, budget=int(c.budget), bound=float(c.bound), l1=float(c.l1),
                  seed=int(c.seed), progress=True)
    info = {"strategy": "lorahub", "inputs": f"{n} labelled val examples per task", "budget": int(c.budget),
            "origin": "zero adapter" if origin is None else "phi_0 (the adapters' init)",
            "weights": dict(zip(tasks, res.weights)), "objective": res.objective, "loss": res.loss}
    return res.adapters, info
