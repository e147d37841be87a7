"""Search spaces given to hydra-optuna-sweeper as `hydra.sweeper.custom_search_space` (called per trial with
the sweep's config and the optuna.trial.Trial; what it suggests becomes the trial's overrides)."""

from __future__ import annotations

from omegaconf import DictConfig


def task_coefs(cfg: DictConfig, trial) -> None:
    """hparams_search=optuna_task_coefs: `++method.task_coefs.<task>` for every task of taskpool.tasks,
    uniform in [task_coefs_space.low, task_coefs_space.high] (++: the key is added to the method's config)."""
    space = cfg.get("task_coefs_space") or {"low": 0.0, "high": 1.0}
    low, high = float(space["low"]), float(space["high"])
    if not low < high:
        raise ValueError(f"task_coefs_space: low={low} must be below high={high}")
    for task in cfg.taskpool.tasks:
        trial.suggest_float(f"++method.task_coefs.{task}", low, high)
