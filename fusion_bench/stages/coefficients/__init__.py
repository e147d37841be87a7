"""A merge's coefficients, one concept in one place. Where they come from:

- `method.scaling_coef`: a number, one number per task, or `search`: the 21-point grid 0.00..1.00 on val by average
  normalized accuracy (grid.py; the merge is affine in it, so the grid merges once: fusion_bench/evaluation/search.py);
- `method.task_coefs`: one factor per task, merged with scaling_coef * task_coefs[t] (task_coefs.py);
- `method.lambdas: search` (TALL masks, Consensus): lambda_t per task on val (grid.py);
- learnt: `coefficients=adamerging|adarank|lorahub` (conf/coefficients/, or a method's own `coefficients:` block): per
  task or per task and tensor (AdaRank: with masks over the task vectors' singular components), from data (learn.py).
The ranges of every block are in fusion_bench/validation/options.py; the table of methods says which are affine
(fusion_bench/merging/registry.py).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fusion_bench.errors import ConfigError


def scaling_coef(cfg: DictConfig):
    """method.scaling_coef as the merge takes it: a number, one per task (a list), or 'search'."""
    coef = cfg.method.get("scaling_coef")
    if coef is not None and not isinstance(coef, (int, float, str)):
        coef = [float(c) for c in coef]
    return coef


def coefficient_cfg(cfg: DictConfig) -> DictConfig:
    """How the coefficients are chosen: the method's own `coefficients` block (method=adamerging, adarank, lorahub),
    else the top-level `coefficients` group (coefficients=grid|adamerging|adarank|lorahub for any weighted method)."""
    own, top = cfg.method.get("coefficients"), cfg.get("coefficients") or OmegaConf.create({"strategy": "grid"})
    if own is not None and top.strategy != "grid" and top.strategy != own.strategy:
        raise ConfigError(f"method.coefficients.strategy={own.strategy} and coefficients={top.strategy}: give one")
    return own if own is not None else top
