"""The whole loop: finetune -> merge -> evaluate -> report, over the model family the config names.

Each stage (fusion_bench.stages) reads only what an earlier one wrote; the family (fusion_bench.families) is the
only place that knows the model and the data.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fusion_bench.export import check_output
from fusion_bench.families import build_family, family_class
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.reporting.memory import log_memory, release
from fusion_bench.reporting.report import write_report
from fusion_bench.stages import finetune_workers, objective, statistics
from fusion_bench.stages.coefficients import coefficient_cfg, grid, learn, scaling_coef, task_coefs
from fusion_bench.stages.evaluate import merged_accuracies, reference_accuracies, trainable_params
from fusion_bench.stages.export import export_merge
from fusion_bench.stages.finetune import finetuned_state, seconds_per_step
from fusion_bench.stages.finetune_workers import finetune_tasks
from fusion_bench.stages.merge import Method, check_svc
from fusion_bench.validation.check import check_options

log = logging.getLogger(__name__)


def normalized(merged: float, finetuned: float, task: str) -> float | None:
    """merged / the task's own fine-tuned score; None (with a warning) where that score is 0 or below (a tiny
    fine-tune, a Matthews correlation): a ratio to ~0 is no measure of anything."""
    if finetuned > 0:
        return merged / finetuned
    log.warning("task %s: its fine-tune scores %.4f on test, so it has no normalized score (null in report.json, "
                "left out of the normalized average)", task, finetuned)
    return None


def averages(per_task: dict[str, dict]) -> dict:
    """`average` over the tasks where each figure is defined, and `average_over`: over how many tasks."""
    cols = ("zeroshot", "finetuned", "merged", "normalized")
    defined = {k: [v[k] for v in per_task.values() if v[k] is not None] for k in cols}
    return {"average": {k: sum(x) / len(x) if x else None for k, x in defined.items()},
            "average_over": {k: len(x) for k, x in defined.items()}}


def validate_config(cfg: DictConfig) -> None:
    """The validation pass, before any work (data, weights, fine-tuning): every option's type and range and the
    method's declared settings (fusion_bench/validation/check.py), the relations the stages own (per-task
    coefficients, fine-tune workers, the objective), the model family's own checks and the output format. Raises
    one ConfigError naming the option; logs warnings."""
    for warning in check_options(cfg):
        log.warning(warning)
    task_coefs.check(cfg)
    finetune_workers.check(cfg)
    family = family_class(str(cfg.model.get("family", "clip")))
    family.validate(cfg)
    objective.check(cfg)  # objective (hparams_search=optuna*): a known one, on a stage that evaluates
    check_svc(cfg)  # method.svc (post=svc): whether SVC can follow this method in this run
    if cfg.stage in ("merge", "all"):  # the stages that write the merged model (fusion_bench.export)
        check_output(family, cfg)


def run(cfg: DictConfig, run_dir: Path, method_name: str) -> dict | None:
    validate_config(cfg)  # every option's type and range, the method's settings, the family's checks: before any work
    fam = build_family(cfg, validate=False)
    torch.set_num_threads(int(cfg.num_threads))
    tasks = list(cfg.taskpool.tasks)
    t0 = time.perf_counter()
    method = coef_cfg = None
    if cfg.stage != "finetune":  # the method's errors, and what it needs that the task pool lacks, before training
        method = Method(cfg.method, fam.mode, method_name, linearized=fam.mode_cfg.get("evaluate") == "linearized")
        coef_cfg = coefficient_cfg(cfg)
        method.task_weights = task_coefs.task_weights(cfg.method, tasks)
        if cfg.stage != "analyze":
            statistics.check(fam, method, tasks)
            learn.check(fam, method, coef_cfg, tasks)
    if cfg.stage in ("finetune", "all"):
        finetune_tasks(fam, tasks, run_dir)  # finetune.workers at a time, each on one thread
        log_memory("finetune")
        if cfg.stage == "finetune":
            return None
    if cfg.stage == "analyze":
        from fusion_bench.analyses import run_analysis

        return run_analysis(fam, method, cfg.analysis, run_dir, method_name)
    finetuned = [finetuned_state(fam, t) for t in tasks]
    lin, coef, search, learnt = method.evaluate_linearized, scaling_coef(cfg), None, None
    method.inputs.update(statistics.task_statistics(fam, method, tasks) or {})
    if method.inputs:
        log_memory("statistics")
    if cfg.method.get("lambdas") == "search":  # TALL masks / Consensus: lambda_t per task on val
        method.chosen["lambdas"] = grid.choose_tall_lambdas(fam, method, finetuned)
        log.info("TALL lambdas chosen on val: %s", dict(zip(tasks, method.chosen["lambdas"])))
    # stage=merge with a fixed coefficient evaluates nothing; with `search` it picks the coefficient on val
    searching = coef == "search" and coef_cfg.strategy == "grid"
    ref = {t: reference_accuracies(fam, t, lin) for t in tasks} if cfg.stage != "merge" or searching else {}
    if coef_cfg.strategy != "grid":
        merged, learnt = learn.learn(fam, method, coef_cfg, finetuned, tasks, run_dir)
        coef = coef_cfg.strategy
    elif searching:
        coef, scores = grid.search_scaling_coef(fam, method, finetuned, ref)
        search = {"grid": list(scores), "val_normalized": list(scores.values())}
        release()  # the search's encoder and task vector: glibc keeps freed heap pages otherwise
    if learnt is None:
        merged = method(fam.pretrained_state, finetuned, coef)
    method.inputs.clear()  # the per-task statistics (one encoder-sized tensor set per task) are spent
    release()  # and the learning's task vectors and encoder, or the statistics' memory
    log_memory("merge")
    if cfg.get("objective"):  # a trial of hparams_search=optuna*: scored on val only, no test figures, no export
        return objective.score_trial(cfg, fam, method, merged, ref, tasks, run_dir, method_name, coef, search)
    if cfg.stage in ("merge", "all"):  # the merged model in the format output.format names
        export_merge(fam, method, merged, run_dir, tasks)
    if cfg.stage == "merge":
        return None
    test = merged_accuracies(fam, merged, "test", tasks, lin)
    peak = log_memory("evaluate")
    per_task = {
        t: {"zeroshot": ref[t]["zeroshot_test"], "finetuned": ref[t]["finetuned_test"], "merged": test[t],
            "normalized": normalized(test[t], ref[t]["finetuned_test"], t)}
        for t in tasks
    }
    report = {
        "model": cfg.model.name,
        "finetune": fam.mode,
        "method": method_name,
        "taskpool": cfg.taskpool.name,
        "scaling_coef": coef,
        "seed": cfg.seed,
        "trainable_params": trainable_params(fam),
        "seconds_per_step": {t: seconds_per_step(fam, t) for t in tasks},
        "tasks": per_task,
        **averages(per_task),
        "search": search,
        "chosen_on_val": method.chosen or None,
        "learnt_coefficients": learnt,
        "storage": merged.storage_summary() if isinstance(merged, TaskSpecificMerge) else None,
        **fam.report_extras(),
        "method_config": OmegaConf.to_container(cfg.method),
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(peak, 2),
    }
    write_report(report, run_dir)
    return report
