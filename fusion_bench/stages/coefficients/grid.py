"""The grid on val: what a merge's coefficients are, chosen on val before the final merge.

- `method.scaling_coef: search`: the 21-point grid 0.00..1.00 on val, by average normalized accuracy (the papers);
- `method.lambdas: search` (TALL masks, Consensus): lambda_t per task on val.
"""

from __future__ import annotations

import logging

from fusion_bench.evaluation.search import GRID, normalized_mean
from fusion_bench.families.base import ModelFamily
from fusion_bench.merging.consensus import tall_mask_lambda_grid, tall_masks
from fusion_bench.stages.evaluate import grid_accuracies, merged_accuracies
from fusion_bench.stages.merge import Method

log = logging.getLogger(__name__)


def search_scaling_coef(fam: ModelFamily, method: Method, finetuned: list[dict], ref: dict[str, dict],
                        tasks: list[str] | None = None) -> tuple[float, dict[float, float]]:
    """The grid point with the best average normalized val accuracy (the first of equals), and every score.
    `tasks`: what `finetuned` are the fine-tunes of (default: the pool's tasks)."""
    val = grid_accuracies(fam, method, finetuned, GRID, "val", tasks)
    scores = {c: normalized_mean(acc, ref, "val") for c, acc in zip(GRID, val)}
    for c, score in scores.items():
        log.log(logging.INFO if tasks is None else logging.DEBUG, "scaling_coef %.2f: val normalized accuracy %.4f",
                c, score)
    return max(scores, key=scores.get), scores


def choose_tall_lambdas(fam: ModelFamily, method: Method, finetuned: list[dict]) -> list[float]:
    """TALL's lambda_t for each task: of tall_mask_lambda_grid, the one whose mask gives task t the best val
    accuracy of theta_0 + m_t * tau_MTL (Wang et al. 2024); ties go to the smaller lambda."""
    base = {k: method.cfg[k] for k in ("base", "ties_k", "ties_agg") if k in method.cfg}
    lin = method.evaluate_linearized
    val = {lam: merged_accuracies(fam, tall_masks(fam.pretrained_state, finetuned, lambdas=lam, **base), "val",
                                  linearized=lin)
           for lam in tall_mask_lambda_grid}
    for lam, accs in val.items():
        log.info("TALL lambda %.1f: val accuracy %s", lam, {t: round(a, 4) for t, a in accs.items()})
    return [max(tall_mask_lambda_grid, key=lambda lam: val[lam][t]) for t in fam.tasks]
