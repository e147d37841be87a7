"""`method.task_coefs`: one coefficient per task, e.g. `method.task_coefs={digits: 0.4, shapes: 0.7}` (or a
list aligned with taskpool.tasks). Task t is merged with scaling_coef * task_coefs[t], so `scaling_coef: 1.0`
makes them the coefficients themselves, and `scaling_coef: search` searches one common factor on val. What
`hparams_search=optuna_task_coefs` samples. Only for methods that weight each task (the scaling_coef of those
accepts one float per task); the others take one float and refuse task_coefs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from omegaconf import DictConfig

from fusion_bench.errors import ConfigError
from fusion_bench.merging.task_vectors import is_number

PER_TASK_METHODS = ("task_arithmetic", "awd_ta", "breadcrumbs", "dare")  # dare: with base=task_arithmetic


def _function_name(method_cfg: DictConfig) -> str:
    return str(method_cfg.get("_target_", "")).rsplit(".", 1)[-1]


def task_weights(method_cfg: DictConfig, tasks: Sequence[str]) -> list[float] | None:
    """method.task_coefs in the order of `tasks`, checked; None when not given."""
    given = method_cfg.get("task_coefs")
    if given is None:
        return None
    tasks = list(tasks)
    if isinstance(given, Mapping):
        missing = [t for t in tasks if t not in given]
        extra = [str(k) for k in given if k not in tasks]
        if missing or extra:
            raise ConfigError(f"method.task_coefs needs one coefficient for each task of taskpool.tasks "
                              f"{tasks}: missing {missing}, not in the pool {extra}")
        values = [given[t] for t in tasks]
    elif isinstance(given, Sequence) and not isinstance(given, str):
        if len(given) != len(tasks):
            raise ConfigError(f"method.task_coefs has {len(given)} values for the {len(tasks)} tasks {tasks}")
        values = list(given)
    else:
        raise ConfigError(f"method.task_coefs={given!r}: expected task -> coefficient (e.g. "
                          f"method.task_coefs={{{tasks[0]}: 0.3}}) or a list aligned with taskpool.tasks")
    bad = {t: v for t, v in zip(tasks, values) if not is_number(v) or not math.isfinite(v)}
    if bad:
        raise ConfigError(f"method.task_coefs must be numbers, got {bad}: each a finite number")
    return [float(v) for v in values]


def check(cfg: DictConfig) -> None:
    """The errors of method.task_coefs, before anything trains."""
    weights = task_weights(cfg.method, cfg.taskpool.tasks)
    if weights is None:
        return
    name = _function_name(cfg.method)
    dare_ties = name == "dare" and cfg.method.get("base", "task_arithmetic") not in ("task_arithmetic", "ta")
    if name not in PER_TASK_METHODS or dare_ties:
        raise ConfigError(f"method.task_coefs: {name} takes one scaling_coef for all tasks; per-task "
                          f"coefficients are for {', '.join(PER_TASK_METHODS[:-1])} and dare with "
                          f"base=task_arithmetic")
    coef = cfg.method.get("scaling_coef")
    if coef is not None and not is_number(coef) and coef != "search":
        raise ConfigError("method.task_coefs and a list method.scaling_coef both give per-task coefficients: "
                          "give one (task_coefs multiplies a single scaling_coef)")
    for strategy in (cfg.get("coefficients"), cfg.method.get("coefficients")):
        if strategy is not None and strategy.get("strategy", "grid") != "grid":
            raise ConfigError(f"method.task_coefs with coefficients={strategy.strategy}: that strategy learns "
                              f"the coefficients itself; drop method.task_coefs")


def scaled(scaling_coef, weights: list[float] | None):
    """What the merging function gets: scaling_coef * weight per task (scaling_coef None: the weights)."""
    if weights is None:
        return scaling_coef
    c = 1.0 if scaling_coef is None else float(scaling_coef)
    return [c * w for w in weights]
