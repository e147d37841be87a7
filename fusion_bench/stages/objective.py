"""`objective: val_normalized` (set by hparams_search=optuna*): the run is one trial of a hyper-parameter
search.

The merge is evaluated on val only, its average normalized val accuracy (mean over tasks of merged val
accuracy / the task's own fine-tune's val accuracy) is written to trial.json in the run dir and returned to
the sweeper, and no test figure is computed. The test figures of the best trial alone come at the end of the
sweep (fusion_bench/hparams/best_trial.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fusion_bench.errors import ConfigError
from fusion_bench.evaluation.search import normalized_mean
from fusion_bench.reporting import finite_json
from fusion_bench.reporting.report import fresh_path
from fusion_bench.stages.evaluate import merged_accuracies
from fusion_bench.store import atomic_write_text

log = logging.getLogger(__name__)
OBJECTIVES = ("val_normalized",)
TRIAL_FILE = "trial.json"


def check(cfg: DictConfig) -> None:
    objective = cfg.get("objective")
    if objective is None:
        return
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective!r}: expected one of {OBJECTIVES} or null")
    if cfg.stage not in ("all", "evaluate"):
        raise ConfigError(f"objective={objective} scores a merge on val: it needs stage=all or "
                          f"stage=evaluate, not stage={cfg.stage}")


def score_trial(cfg: DictConfig, fam, method, merged, ref: dict, tasks: list[str], run_dir: Path,
                method_name: str, coef, search: dict | None) -> dict:
    """The trial's val figures (trial.json in run_dir); `value` is what the sweeper maximises."""
    val = merged_accuracies(fam, merged, "val", tasks, method.evaluate_linearized)
    per_task = {t: {"merged_val": val[t], "finetuned_val": ref[t]["finetuned_val"],
                    "zeroshot_val": ref[t]["zeroshot_val"],
                    "normalized_val": val[t] / max(ref[t]["finetuned_val"], 1e-12)} for t in tasks}
    record = {
        "objective": cfg.objective,
        "value": normalized_mean(val, ref, "val"),
        "model": cfg.model.name, "finetune": fam.mode, "method": method_name, "taskpool": cfg.taskpool.name,
        "scaling_coef": coef,
        "task_coefs": None if method.task_weights is None else dict(zip(tasks, method.task_weights)),
        "tasks": per_task,
        "search": search,
        "method_config": OmegaConf.to_container(cfg.method, resolve=True),
    }
    path = atomic_write_text(fresh_path(Path(run_dir) / TRIAL_FILE), finite_json.dumps(record, indent=2))
    log.info("trial: average normalized val accuracy %.4f (%s); %s", record["value"],
             ", ".join(f"{t} {v['normalized_val']:.3f}" for t, v in per_task.items()), path)
    return record


def trial_value(cfg: DictConfig, result: dict | None) -> float | None:
    """What the Hydra task function returns: the trial's objective, or None for an ordinary run."""
    if cfg.get("objective") is None or result is None:
        return None
    return float(result["value"])
