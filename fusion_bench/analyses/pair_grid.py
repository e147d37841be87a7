"""Two tasks' fine-tunes on a grid of task-arithmetic coefficients: theta(a1, a2) = theta_0 + a1 tau_1 + a2 tau_2
evaluated on both tasks' inputs, every measure of the analyses from one pass per grid point.

Measures (each per task t, at (a1, a2); `single` is the model with task t's vector alone, theta_0 + a_t tau_t):
- `xi`:     P_x[f_t(x; theta(a1, a2)) != f_t(x; single)]: the weight disentanglement error's term (Ortiz-Jimenez
            et al., 2023) summed over the two tasks;
- `xi_rep`: E_x[1 - cos(phi(x; theta(a1, a2)), phi(x; single))] over the encoder's features phi (before the head):
            the same question asked of the representation instead of the predictions;
- `loss`:   E_x[cross-entropy of task t's head at theta(a1, a2)] (the loss landscape; needs no single-task model).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch.nn.functional as F
from rich.progress import track

from fusion_bench.analyses.outputs import Outputs, task_outputs
from fusion_bench.merging import task_arithmetic

MEASURES = ("xi", "xi_rep", "loss")
NEEDS_SINGLE = {"xi": True, "xi_rep": True, "loss": False}


def measure(name: str, merged: Outputs, single: Outputs | None) -> float:
    if name == "xi":
        return (merged.pred != single.pred).double().mean().item()
    if name == "xi_rep":
        return (1 - F.cosine_similarity(merged.features.double(), single.features.double(), dim=-1)).mean().item()
    if name == "loss":
        return merged.loss.double().mean().item()
    raise KeyError(f"unknown measure {name!r}; expected one of {MEASURES}")


def pair_grid(fam, method, task_pair: Sequence[str], finetuned: Sequence[Mapping], grid: Sequence[float],
              split: str, measures: Sequence[str]) -> dict[str, np.ndarray]:
    """{measure: values[i, j, k]} for (a1, a2) = (grid[i], grid[j]) and k the task of the pair; sum over k for
    the two-task figures. Models are evaluated as the pipeline evaluates merges (method.evaluate_linearized)."""
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise KeyError(f"unknown measure(s) {unknown}; expected {MEASURES}")
    pre, lin = fam.pretrained_state, method.evaluate_linearized
    feats = "xi_rep" in measures

    def outputs(weights: Mapping, task: str) -> Outputs:
        return task_outputs(fam, fam.model_with(weights, lin), task, split, features=feats)

    single = {}
    if any(NEEDS_SINGLE[m] for m in measures):
        for k, t in enumerate(task_pair):
            for a in grid:
                single[(t, a)] = outputs(task_arithmetic(pre, [finetuned[k]], scaling_coef=[a]), t)
    values = {m: np.zeros((len(grid), len(grid), len(task_pair))) for m in measures}
    for (i, a1), (j, a2) in track(list(itertools.product(enumerate(grid), enumerate(grid))),
                                  description=f"grid over {task_pair[0]} x {task_pair[1]}"):
        merged = task_arithmetic(pre, list(finetuned), scaling_coef=[a1, a2])
        enc = fam.model_with(merged, lin)
        for k, (t, a) in enumerate(zip(task_pair, (a1, a2))):
            out = task_outputs(fam, enc, t, split, features=feats)
            for m in measures:
                values[m][i, j, k] = measure(m, out, single.get((t, a)))
        del enc, merged
    return values

