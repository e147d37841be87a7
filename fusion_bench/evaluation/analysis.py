"""`stage=analyze analysis=<kind>`: the analyses the seed papers use to explain merging. Here: task-vector cosine
similarity, weight disentanglement error, normalized accuracy against the number of merged tasks, and the table
of every kind (`run_analysis`). The others have a file each: negation.py, kernel.py, heads.py, landscape.py,
pairwise.py. Each writes numbers (<kind>.json), a Markdown table (<kind>.md) and PNG figures."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fusion_bench.evaluation.pair_grid import pair_grid
from fusion_bench.evaluation.search import GRID, normalized_mean
from fusion_bench.merging import awd
from fusion_bench.merging.task_vectors import prepare
from fusion_bench.reporting import finite_json, plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import matrix_table, md_table
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


def chosen_tasks(fam, names, count: int | None = None) -> list[str]:
    """`analysis.tasks`, checked against taskpool.tasks; None: the pool's tasks (its first `count`)."""
    pool = list(fam.cfg.taskpool.tasks)
    tasks = list(names) if names else pool[:count] if count else pool
    if [t for t in tasks if t not in pool] or (count and len(tasks) != count) or len(set(tasks)) != len(tasks):
        raise ValueError(f"analysis.tasks={tasks}: give {count or 'one or more'} distinct task(s) of taskpool.tasks "
                         f"{pool}")
    return tasks


def require_plain_method(method, method_name: str, who: str) -> None:
    """Analyses that merge by calling the method on fine-tunes alone (heads, pairwise) cannot run methods that the
    pipeline prepares first: lambdas chosen on val (TALL, Consensus), statistics (RegMean, Fisher) or learnt
    coefficients (AdaMerging, LoraHub)."""
    cfg = method.cfg
    if cfg.get("lambdas") == "search" or cfg.get("statistics") is not None or cfg.get("coefficients") is not None:
        raise ValueError(f"analysis={who} calls method={method_name} on the fine-tunes alone; it needs lambdas chosen "
                         f"on val, statistics or learnt coefficients, which this analysis does not prepare: use a "
                         f"data-free method with a scaling coefficient (task_arithmetic, ties, dare, awd_ta, ...)")


def disentanglement_error(fam, method, task_pair: Sequence[str], grid: Sequence[float],
                          split: str = "test") -> np.ndarray:
    """xi[i, j] = sum_t P_x[f_t(x; theta0 + a_t tau_t) != f_t(x; theta0 + a1 tau1 + a2 tau2)],
    (a1, a2) = grid[i], grid[j] (the grid evaluation of fusion_bench/evaluation/pair_grid.py)."""
    fts = [finetuned_state(fam, t) for t in task_pair]
    return pair_grid(fam, method, task_pair, fts, grid, split, ("xi",))["xi"].sum(-1)


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


def _cosine(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    tasks = list(fam.cfg.taskpool.tasks)
    cos = cosine_matrix(fam.pretrained_state, [finetuned_state(fam, t) for t in tasks])
    png = plots.heatmap(cos, tasks, f"task-vector cosine similarity (finetune={fam.mode})",
                        fresh_path(run_dir / "cosine.png"), vmin=-0.1, vmax=1.0)
    off = cos[~np.eye(len(tasks), dtype=bool)]
    result = {"tasks": tasks, "cosine": cos.tolist(), "mean_abs_off_diagonal": float(np.abs(off).mean())}
    md = (f"Task-vector cosine similarity; mean |cos| off the diagonal {result['mean_abs_off_diagonal']:.4f}.\n\n"
          + matrix_table(cos, tasks, tasks))
    return result, md, [png]


def _disentanglement(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    pair = chosen_tasks(fam, cfg.tasks, 2)
    grid = [round(float(a), 4) for a in np.linspace(-2, 2, int(cfg.grid_points))]
    xi = disentanglement_error(fam, method, pair, grid, cfg.split)
    png = plots.grid_heatmap(xi, grid, grid, f"weight disentanglement error (finetune={fam.mode})",
                             fresh_path(run_dir / "disentanglement.png"), f"alpha ({pair[0]})", f"alpha ({pair[1]})",
                             vmax=2.0)  # xi sums two error rates: one scale for every mode
    result = {"tasks": pair, "grid": grid, "xi": xi.tolist(), "xi_mean": float(xi.mean())}
    md = (f"Weight disentanglement error of {pair[0]} (rows: alpha_1) and {pair[1]} (columns: alpha_2) on "
          f"{cfg.split}; mean over the grid {xi.mean():.4f}.\n\n" + matrix_table(xi, grid, grid, "a1 \\ a2"))
    return result, md, [png]


def _num_tasks(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    coef = cfg.scaling_coef
    curve = normalized_vs_num_tasks(fam, method, coef if coef == "search" else float(coef), int(cfg.max_subsets))
    normalized = [c["normalized"] for c in curve.values()]
    png = plots.curves(list(curve), {f"{method_name} ({fam.mode})": normalized},
                       "normalized accuracy vs number of merged tasks", "tasks merged", "normalized accuracy",
                       fresh_path(run_dir / "num_tasks.png"))
    result = {"num_tasks": list(curve), "normalized": normalized, "scaling_coef": coef,
              "scaling_coefs": [c["scaling_coefs"] for c in curve.values()]}
    md = md_table(["tasks merged", "normalized accuracy (mean over subsets)", "coefficients"],
                  [[k, c["normalized"], ", ".join(map(str, c["scaling_coefs"]))] for k, c in curve.items()])
    return result, md, [png]


def _analyses() -> dict:
    from fusion_bench.evaluation import heads, kernel, landscape, negation, pairwise

    return {"cosine": _cosine, "disentanglement": _disentanglement, "num_tasks": _num_tasks,
            "negation": negation.run, "kernel": kernel.run, "heads": heads.run, "loss_landscape": landscape.run,
            "pairwise": pairwise.run}


def run_analysis(fam, method, analysis_cfg, run_dir: Path, method_name: str) -> dict:
    """`analysis=<kind>`: <kind>.json (numbers), <kind>.md (a table) and PNG figures in the run directory, never
    over an earlier file (a second run into the same folder writes <kind>-1.json, ...)."""
    run_dir, kind = Path(run_dir), analysis_cfg.kind
    analyses = _analyses()
    if kind not in analyses:
        raise ValueError(f"unknown analysis.kind={kind!r}; expected one of {sorted(analyses)}")
    result, md, figures = analyses[kind](fam, method, analysis_cfg, run_dir, method_name)
    result.update(kind=kind, model=fam.cfg.model.name, finetune=fam.mode, method=method_name,
                  taskpool=fam.cfg.taskpool.name, figures=[Path(f).name for f in figures])
    out = atomic_write_text(fresh_path(run_dir / f"{kind}.json"), finite_json.dumps(result, indent=1))
    head = f"# analysis={kind}: {fam.cfg.model.name}, finetune={fam.mode}, method={method_name}\n\n"
    atomic_write_text(out.with_suffix(".md"), head + md + "".join(f"\n![{kind}]({Path(f).name})\n" for f in figures))
    log.info("analysis %s written to %s", kind, out)
    return result
