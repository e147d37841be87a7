"""The analyses the seed papers use to explain merging: task-vector cosine similarity, weight disentanglement
error, and normalized accuracy against the number of merged tasks. Each writes numbers (JSON) and a PNG."""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from fusion_bench.evaluation.accuracy import predictions
from fusion_bench.evaluation.search import GRID, normalized_mean
from fusion_bench.merging import awd, task_arithmetic
from fusion_bench.merging.task_vectors import prepare
from fusion_bench.reporting import plots
from fusion_bench.stages.evaluate import grid_accuracies, merged_accuracies, reference_accuracies
from fusion_bench.stages.finetune import finetuned_state
from fusion_bench.store import atomic_write_text

log = logging.getLogger(__name__)


def gram_matrix(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """G[i, j] = <tau_i, tau_j> over all floating-point entries: the merging engine's streaming pass (AWD's)."""
    return awd.gram_matrix(prepare(pretrained, finetuned, "cosine_matrix")).numpy()


def cosine_matrix(pretrained, finetuned) -> np.ndarray:
    g = gram_matrix(pretrained, finetuned)
    norms = np.sqrt(np.clip(np.diag(g), 1e-300, None))
    return g / np.outer(norms, norms)


def _predictions(fam, encoder, task: str, split: str) -> torch.Tensor:
    return predictions(fam.classifier(encoder, task), fam.tasks[task].split(split), fam.cfg.model.eval_batch_size,
                       **fam.eval_where)[0]


def disentanglement_error(fam, method, task_pair: Sequence[str], grid: Sequence[float],
                          split: str = "test") -> np.ndarray:
    """xi[i, j] = sum_t P_x[f_t(x; theta0 + a_t tau_t) != f_t(x; theta0 + a1 tau1 + a2 tau2)],
    (a1, a2) = grid[i], grid[j]."""
    t1, t2 = task_pair
    pre, lin = fam.pretrained_state, method.evaluate_linearized  # evaluated as the pipeline evaluates merges
    fts = [finetuned_state(fam, t1), finetuned_state(fam, t2)]
    single = {
        (t, a): _predictions(fam, fam.model_with(task_arithmetic(pre, [fts[i]], scaling_coef=[a]), lin), t, split)
        for i, t in enumerate(task_pair) for a in grid
    }
    xi = np.zeros((len(grid), len(grid)))
    for (i, a1), (j, a2) in track(list(itertools.product(enumerate(grid), enumerate(grid))),
                                  description="disentanglement grid"):
        enc = fam.model_with(task_arithmetic(pre, fts, scaling_coef=[a1, a2]), lin)
        for t, a in ((t1, a1), (t2, a2)):
            xi[i, j] += (_predictions(fam, enc, t, split) != single[(t, a)]).float().mean().item()
    return xi


def normalized_vs_num_tasks(fam, method, scaling_coef: float | str, max_subsets: int, seed: int = 0) -> dict[int, dict]:
    """Mean over task subsets of size k (2..n) of the average normalized test accuracy of the merged model.
    scaling_coef="search" (the default, as the papers do) picks the coefficient on val for each subset."""
    tasks, lin = list(fam.tasks), method.evaluate_linearized
    ref = {t: reference_accuracies(fam, t, lin) for t in tasks}
    states = {t: finetuned_state(fam, t) for t in tasks}
    rng = random.Random(seed)
    out = {}
    for k in range(2, len(tasks) + 1):
        subsets = list(itertools.combinations(tasks, k))
        subsets = rng.sample(subsets, min(max_subsets, len(subsets)))
        scores, coefs = [], []
        for subset in subsets:
            fts = [states[t] for t in subset]
            coef = scaling_coef
            if coef == "search":
                val = grid_accuracies(fam, method, fts, GRID, "val", list(subset))
                coef = GRID[max(range(len(val)), key=lambda i: normalized_mean(val[i], ref, "val"))]
            test = merged_accuracies(fam, method(fam.pretrained_state, fts, float(coef)), "test", list(subset), lin)
            scores.append(normalized_mean(test, ref, "test"))
            coefs.append(coef)
        out[k] = {"normalized": float(np.mean(scores)), "scaling_coefs": coefs}
        log.info("%d tasks: normalized accuracy %.4f over %d subsets", k, out[k]["normalized"], len(subsets))
    return out


def run_analysis(fam, method, analysis_cfg, run_dir: Path, method_name: str) -> dict:
    run_dir = Path(run_dir)
    kind, mode = analysis_cfg.kind, fam.mode
    tasks = list(fam.cfg.taskpool.tasks)
    if kind == "cosine":
        cos = cosine_matrix(fam.pretrained_state, [finetuned_state(fam, t) for t in tasks])
        result = {"tasks": tasks, "cosine": cos.tolist()}
        plots.heatmap(cos, tasks, f"task-vector cosine similarity (finetune={mode})", run_dir / "cosine.png",
                      vmin=-0.1, vmax=1.0)
    elif kind == "disentanglement":
        pair = list(analysis_cfg.tasks or tasks[:2])
        grid = [round(float(a), 4) for a in np.linspace(-2, 2, int(analysis_cfg.grid_points))]
        xi = disentanglement_error(fam, method, pair, grid, analysis_cfg.split)
        result = {"tasks": pair, "grid": grid, "xi": xi.tolist()}
        plots.grid_heatmap(xi, grid, grid, f"weight disentanglement error (finetune={mode})",
                           run_dir / "disentanglement.png", f"alpha ({pair[0]})", f"alpha ({pair[1]})",
                           vmax=2.0)  # xi sums two error rates: one scale for every mode
    elif kind == "num_tasks":
        coef = analysis_cfg.scaling_coef
        curve = normalized_vs_num_tasks(fam, method, coef if coef == "search" else float(coef), int(analysis_cfg.max_subsets))
        normalized = [c["normalized"] for c in curve.values()]
        result = {"num_tasks": list(curve), "normalized": normalized, "scaling_coef": coef,
                  "scaling_coefs": [c["scaling_coefs"] for c in curve.values()]}
        plots.curves(list(curve), {f"{method_name} ({mode})": normalized},
                     "normalized accuracy vs number of merged tasks", "tasks merged", "normalized accuracy",
                     run_dir / "num_tasks.png")
    else:
        raise ValueError(f"unknown analysis.kind={kind!r}; expected cosine, disentanglement or num_tasks")
    result.update(kind=kind, model=fam.cfg.model.name, finetune=mode, method=method_name)
    atomic_write_text(run_dir / f"{kind}.json", json.dumps(result, indent=1))
    return result
