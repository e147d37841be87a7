"""analysis=heads: task arithmetic and weight disentanglement with frozen zero-shot heads against heads trained
with each fine-tune (finetune.train_head), the question of the representation-vs-heads papers: is the
disentanglement measured on predictions a property of the encoder, or of the heads it is read through?

Both sets of fine-tunes (the run's mode, train_head=false and true) must be in the store. For each:
- task addition over the pool's tasks: the configured method (task arithmetic by default), the coefficient from val
  (`analysis.scaling_coef: search`) or fixed, test accuracy and normalized accuracy (each task read through its own
  head: the zero-shot head, or its trained head; heads are never merged);
- the weight disentanglement error xi(a1, a2) of a task pair on predictions (pair_grid.py);
- the representation-level error xi_rep(a1, a2) = sum_{t=1,2} E_{x~D_t}[1 - cos(phi(x; theta_0 + a_t tau_t),
  phi(x; theta_0 + a1 tau_1 + a2 tau_2))], phi the image encoder's output features (no head involved), over the
  same grid; `xi_mean` / `xi_rep_mean` are the means over the grid.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from fusion_bench.analyses.common import chosen_tasks, require_plain_method
from fusion_bench.analyses.pair_grid import pair_grid
from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import md_table
from fusion_bench.stages.coefficients.grid import search_scaling_coef
from fusion_bench.stages.evaluate import merged_accuracies, reference_accuracies
from fusion_bench.stages.finetune import finetuned_state

log = logging.getLogger(__name__)
KINDS = {"frozen": False, "trained": True}


def family_with_heads(fam, trained: bool):
    """The same run's family with finetune.train_head set to `trained` (itself when it already is)."""
    if bool(fam.mode_cfg.get("train_head", False)) == trained:
        return fam
    from fusion_bench.families import build_family

    return build_family(OmegaConf.merge(fam.cfg, {"finetune": {"train_head": trained}}))


def heads_figures(fam, method, tasks: list[str], pair: list[str], grid: list[float], split: str,
                  scaling_coef) -> dict:
    """Task addition and (representation) disentanglement of one family (one kind of head)."""
    lin = method.evaluate_linearized
    ref = {t: reference_accuracies(fam, t, lin) for t in tasks}
    fts = {t: finetuned_state(fam, t) for t in tasks}
    coef = scaling_coef
    if coef == "search":
        coef, _ = search_scaling_coef(fam, method, list(fts.values()), ref, tasks)
    test = merged_accuracies(fam, method(fam.pretrained_state, list(fts.values()), float(coef)), "test", tasks, lin)
    per_task = {t: {"finetuned": ref[t]["finetuned_test"], "merged": test[t],
                    "normalized": test[t] / max(ref[t]["finetuned_test"], 1e-12)} for t in tasks}
    values = pair_grid(fam, method, pair, [fts[t] for t in pair], grid, split, ("xi", "xi_rep"))
    xi, rep = values["xi"].sum(-1), values["xi_rep"].sum(-1)
    return {"scaling_coef": coef, "tasks": per_task,
            "average": {k: float(np.mean([r[k] for r in per_task.values()])) for k in ("finetuned", "merged", "normalized")},
            "xi": xi.tolist(), "xi_mean": float(xi.mean()), "xi_rep": rep.tolist(), "xi_rep_mean": float(rep.mean())}


def run(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    require_plain_method(method, method_name, "heads")
    tasks, pair = list(fam.cfg.taskpool.tasks), chosen_tasks(fam, cfg.tasks, 2)
    grid = [round(float(a), 4) for a in np.linspace(float(cfg.low), float(cfg.high), int(cfg.grid_points))]
    coef = cfg.scaling_coef if cfg.scaling_coef == "search" else float(cfg.scaling_coef)
    by_kind = {}
    for kind, trained in KINDS.items():
        by_kind[kind] = heads_figures(family_with_heads(fam, trained), method, tasks, pair, grid, str(cfg.split), coef)
        log.info("%s heads: task addition normalized %.4f, xi %.4f, xi_rep %.4f", kind,
                 by_kind[kind]["average"]["normalized"], by_kind[kind]["xi_mean"], by_kind[kind]["xi_rep_mean"])
    result = {"tasks": tasks, "pair": pair, "grid": grid, "split": str(cfg.split), **by_kind}
    rep_max = max(float(np.max(by_kind[k]["xi_rep"])) for k in KINDS) or 1.0
    panels = {f"{name} ({kind} heads)": (np.asarray(by_kind[kind][key]), vmax, label)
              for key, name, vmax, label in (("xi", "xi on predictions", 2.0, "disentanglement error"),
                                             ("xi_rep", "xi_rep on features", rep_max, "sum of 1 - cos"))
              for kind in KINDS}
    png = plots.grid_heatmaps(panels, grid, grid, fresh_path(run_dir / "heads.png"), f"alpha ({pair[0]})",
                              f"alpha ({pair[1]})")
    rows = [[kind, r["scaling_coef"], r["average"]["merged"], r["average"]["normalized"], r["xi_mean"],
             r["xi_rep_mean"]] for kind, r in by_kind.items()]
    md = (f"finetune={fam.mode}, method={method_name}: task addition over {len(tasks)} tasks (test) and the "
          f"disentanglement of {pair[0]} x {pair[1]} over [{grid[0]}, {grid[-1]}]^2 on {cfg.split}, with frozen "
          f"zero-shot heads and with heads trained with each fine-tune (never merged).\n\n"
          + md_table(["heads", "scaling_coef", "merged accuracy", "normalized", "xi (mean over grid)",
                      "xi_rep (mean over grid)"], rows))
    return result, md, [png]
