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

from fusion_bench.families import build_family
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.reporting.report import write_report
from fusion_bench.stages import coefficients
from fusion_bench.stages.evaluate import merged_accuracies, reference_accuracies, trainable_params
from fusion_bench.stages.finetune import ensure_finetuned, finetuned_state, seconds_per_step
from fusion_bench.stages.merge import Method, save_merge

log = logging.getLogger(__name__)


def _coef(cfg: DictConfig):
    coef = cfg.method.get("scaling_coef")
    if coef is not None and not isinstance(coef, (int, float, str)):
        coef = [float(c) for c in coef]
    return coef


def run(cfg: DictConfig, run_dir: Path, method_name: str) -> dict | None:
    fam = build_family(cfg)
    torch.set_num_threads(int(cfg.num_threads))
    tasks = list(cfg.taskpool.tasks)
    t0 = time.perf_counter()
    method = Method(cfg.method, fam.mode) if cfg.stage != "finetune" else None  # its errors before any training
    if cfg.stage in ("finetune", "all"):
        for task in tasks:
            ensure_finetuned(fam, task)
        if cfg.stage == "finetune":
            return None
    if cfg.stage == "analyze":
        from fusion_bench.evaluation.analysis import run_analysis

        return run_analysis(fam, method, cfg.analysis, run_dir, method_name)
    finetuned = [finetuned_state(fam, t) for t in tasks]
    lin, coef, search = method.evaluate_linearized, _coef(cfg), None
    if cfg.method.get("lambdas") == "search":  # TALL masks / Consensus: lambda_t per task on val
        method.chosen["lambdas"] = coefficients.choose_tall_lambdas(fam, method, finetuned)
        log.info("TALL lambdas chosen on val: %s", dict(zip(tasks, method.chosen["lambdas"])))
    # stage=merge with a fixed coefficient evaluates nothing; with `search` it picks the coefficient on val
    ref = {t: reference_accuracies(fam, t, lin) for t in tasks} if cfg.stage != "merge" or coef == "search" else {}
    if coef == "search":
        coef, scores = coefficients.search_scaling_coef(fam, method, finetuned, ref)
        search = {"grid": list(scores), "val_normalized": list(scores.values())}
    merged = method(fam.pretrained_state, finetuned, coef)
    if cfg.stage == "merge":
        log.info("merged weights written to %s", save_merge(merged, run_dir, tasks))
        return None
    test = merged_accuracies(fam, merged, "test", tasks, lin)
    per_task = {
        t: {"zeroshot": ref[t]["zeroshot_test"], "finetuned": ref[t]["finetuned_test"], "merged": test[t],
            "normalized": test[t] / max(ref[t]["finetuned_test"], 1e-12)}
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
        "average": {k: sum(v[k] for v in per_task.values()) / len(per_task)
                    for k in ("zeroshot", "finetuned", "merged", "normalized")},
        "search": search,
        "chosen_on_val": method.chosen or None,
        "storage": merged.storage_summary() if isinstance(merged, TaskSpecificMerge) else None,
        **fam.report_extras(),
        "method_config": OmegaConf.to_container(cfg.method),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(report, run_dir)
    return report
