"""Fisher merging (Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

Per entry, with diagonal Fishers ``F_t`` (:func:`fusion_bench.statistics.diagonal_fisher`)::

    theta = sum_t c_t max(F_t, eps) theta_t / sum_t c_t max(F_t, eps)

``c_t = lambda_t / ||F_t||`` with ``normalize=True`` (``||F_t||``: the L2 norm of task t's whole Fisher over
the merged keys), else ``c_t = lambda_t``; ``lambda_t``: per-model merging coefficients (default equal).
Where every ``F_t`` is at most ``eps`` the result is the ``c``-weighted mean (the plain mean for equal
``lambda`` and ``normalize=False``).

Reference defaults (mmatena/model_merging ``merge_and_evaluate.py``; FusionBench ``fisher_merging``):
Fishers normalized per task by their global L2 norm (both: ``normalize_fishers`` / ``normalize_fisher_weight``
default True), floor 1e-6 (mmatena: ``max(F, 1e-6)``, by default on the first, "target" model only;
FusionBench: ``F + 1e-6`` on all), per-model coefficients (mmatena: grid / random search; FusionBench: 1/n).
Here: normalize=True, eps=1e-6 on every task (no target model in multi-task merging), equal coefficients.
Keys without a Fisher in any task take the ``lambda``-weighted mean of the fine-tuned weights; integer /
bool buffers are copied from ``pretrained``; the result has the pretrained dtypes; arithmetic is fp32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import FLAG, positive

from .registry import merging_method
from .task_vectors import StateDict, finish, prepare, scaling_coefs, statistic_keys

log = logging.getLogger(__name__)


@merging_method(kind="statistics", statistic="fisher")
def fisher_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    fishers: Sequence[Mapping[str, Tensor]],
    epsilon: float = 1e-6,
    normalize: bool = True,
    coefficients: float | Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Fisher-weighted average of ``finetuned`` (one Fisher dict per task, keyed like the weights).

    Raises ``ValueError`` naming the key (and the task) for a Fisher given for some tasks only, one of a key
    that is not a float weight, a shape mismatch, and (with ``normalize``) a task whose Fisher is all zero.
    """
    inp = prepare(pretrained, finetuned, "fisher_merging")
    if not epsilon > 0:
        raise ValueError(f"fisher_merging: epsilon must be > 0 (the floor of the Fisher), got {epsilon}")
    lam = [1.0] * inp.n if coefficients is None else scaling_coefs(coefficients, inp.n, "fisher_merging")
    if min(lam) < 0 or sum(lam) <= 0:
        raise ValueError(f"fisher_merging: coefficients must be >= 0 and not all 0, got {lam}")
    fisher_keys = statistic_keys(inp, fishers, "fisher_merging", "Fisher")
    for key in fisher_keys:
        for f, name in zip(fishers, inp.names):
            if f[key].shape != inp.shapes[key]:
                raise ValueError(
                    f"fisher_merging: the Fisher of {key!r} for {name} has shape {tuple(f[key].shape)}, "
                    f"the weight {tuple(inp.shapes[key])}"
                )
    coef = list(lam)
    if normalize:
        for t, (f, name) in enumerate(zip(fishers, inp.names)):
            norm = math.sqrt(sum(f[k].double().square().sum().item() for k in fisher_keys))
            if norm == 0.0:
                raise ValueError(
                    f"fisher_merging: the Fisher of {name} is zero everywhere; use normalize=False"
                )
            coef[t] = lam[t] / norm
    plain = [k for k in inp.float_keys if k not in fishers[0]]
    if plain:
        log.info("fisher_merging: %d float keys have no Fisher and take the weighted mean", len(plain))
    out: dict[str, Tensor] = {}
    for key in inp.float_keys:
        num = torch.zeros(inp.shapes[key], dtype=torch.float32, device=inp.pretrained[key].device)
        den = torch.zeros_like(num)
        for t, ft in enumerate(inp.finetuned):
            if key in fishers[t]:
                w = (
                    fishers[t][key]
                    .to(device=num.device, dtype=torch.float32)
                    .clamp_min(epsilon)
                    .mul_(coef[t])
                )
            else:
                w = torch.full_like(num, lam[t])
            num.addcmul_(w, ft[key].to(device=num.device, dtype=torch.float32))
            den.add_(w)
        out[key] = num.div_(den).to(inp.dtypes[key])
    return finish(inp, out)

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
fisher_merging.ranges = {"epsilon": positive("the floor of the Fisher"), "normalize": FLAG}
