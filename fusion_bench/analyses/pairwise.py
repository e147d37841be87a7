"""analysis=pairwise: every pair of the pool's tasks merged by the configured method.

For each pair (a, b): the coefficient from val (`analysis.scaling_coef: search`, the pipeline's 21-point search
over that pair: stages/coefficients/grid.py) or fixed, then the normalized test accuracy of a and of b (merged /
the task's own fine-tune). The scatter of those two numbers per pair is the picture the task-arithmetic papers
draw of interference; in a multirun over methods the sweep folder gets one plot with a colour per method and each
method's mean marked (fusion_bench/reporting/pairwise_summary.py, called by the multirun summary).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
from rich.progress import track

from fusion_bench.analyses.common import chosen_tasks, require_plain_method
from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import md_table
from fusion_bench.stages.coefficients.grid import search_scaling_coef
from fusion_bench.stages.evaluate import merged_accuracies, reference_accuracies
from fusion_bench.stages.finetune import finetuned_state

log = logging.getLogger(__name__)


def run(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    require_plain_method(method, method_name, "pairwise")
    tasks, lin = chosen_tasks(fam, cfg.tasks), method.evaluate_linearized
    if len(tasks) < 2:
        raise ValueError(f"analysis=pairwise needs at least two tasks, got {tasks}")
    ref = {t: reference_accuracies(fam, t, lin) for t in tasks}
    fts = {t: finetuned_state(fam, t) for t in tasks}
    pairs = []
    for a, b in track(list(itertools.combinations(tasks, 2)), description=f"pairwise ({method_name})"):
        states = [fts[a], fts[b]]
        coef = cfg.scaling_coef
        coef = search_scaling_coef(fam, method, states, ref, [a, b])[0] if coef == "search" else float(coef)
        test = merged_accuracies(fam, method(fam.pretrained_state, states, coef), "test", [a, b], lin)
        norm = [test[t] / max(ref[t]["finetuned_test"], 1e-12) for t in (a, b)]
        pairs.append({"tasks": [a, b], "scaling_coef": coef, "accuracy": [test[a], test[b]], "normalized": norm})
        log.info("pair %s + %s at %.2f: normalized %.4f, %.4f", a, b, coef, *norm)
    mean = float(np.mean([p["normalized"] for p in pairs]))
    result = {"tasks": tasks, "scaling_coef": cfg.scaling_coef, "pairs": pairs, "mean_normalized": mean}
    label = f"{method_name} ({fam.mode})"
    png = plots.scatter({label: [p["normalized"] for p in pairs]},
                        f"pairwise merges, {fam.cfg.model.name} (one point per pair)", "normalized accuracy, task a",
                        "normalized accuracy, task b", fresh_path(run_dir / "pairwise.png"))
    rows = [[f"{p['tasks'][0]} + {p['tasks'][1]}", p["scaling_coef"], *p["normalized"]] for p in pairs]
    md = (f"Every pair merged by {method_name} (finetune={fam.mode}); normalized test accuracy of each task of the "
          f"pair; mean over pairs and tasks {mean:.4f}.\n\n"
          + md_table(["pair (a + b)", "scaling_coef", "normalized a", "normalized b"], rows))
    return result, md, [png]
