"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

1. Trim: per task keep the entries with ``|tau_t| >= v_t`` where ``v_t`` is the exact
   ``m``-th largest ``|tau_t|`` over the WHOLE flattened task vector (all float keys
   concatenated), ``m = int(k * n_params)`` (the same count as peft's ``magnitude_based_pruning``);
   with ``per_tensor=True`` per key instead (``m = int(k * numel)``, like peft's ``prune``).
   Ties at the threshold: every entry equal to ``v_t`` is kept, so more than ``m`` entries can
   survive when values repeat (peft's ``topk`` keeps exactly ``m``, breaking ties arbitrarily).
   ``m == 0`` keeps nothing (peft too).
2. Elect: ``gamma = sign(sum_t trimmed_t)``; a zero sum elects ``+`` (peft's convention).
3. Disjoint mean over the entries that are non-zero and agree with ``gamma``
   (count clamped to >= 1).
4. ``theta = theta_0 + lambda * tau_m``.

Global top-k runs two passes: a task-outer pass writes one task's ``|tau|`` into a flat fp32
buffer (4 bytes/parameter, reused for every task) and finds ``v_t`` exactly by radix select
(:func:`~fusion_bench.merging.task_vectors.kth_largest`); a keys-outer pass then merges.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import FLAG, ONE_COEF, fraction

from .registry import merging_method
from .task_vectors import (
    MergeInputs,
    StateDict,
    Transform,
    Workspace,
    fill_abs_task_vector,
    is_number,
    kth_largest,
    n_keep,
    prepare,
    scalar_coef,
    shrink_lambda,
    stream_merge,
)

log = logging.getLogger(__name__)


@merging_method("ties", kind="data-free", affine=True)
def ties_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    k: float = 0.2,
    scaling_coef: float = 0.3,
    per_tensor: bool = False,
) -> dict[str, Tensor]:
    """TIES merging; ``k`` in (0, 1] is the kept fraction of each task vector (see module doc)."""
    inp = prepare(pretrained, finetuned, "ties_merging")
    check_k(k, "ties_merging")
    lam = scalar_coef(scaling_coef, "ties_merging")
    return ties_merge(inp, float(k), lam, per_tensor)


def check_k(k: float, method: str) -> None:
    if not is_number(k) or not (0.0 < float(k) <= 1.0):
        raise ValueError(f"{method}: k={k!r} must be a fraction in (0, 1] (0.2 keeps the top 20% of |tau|)")


def global_thresholds(
    inp: MergeInputs, k: float, transform: Transform | None = None, extra: int = 0
) -> list[float]:
    """Exact per-task magnitude thresholds over the whole flattened (transformed) task vector: the
    ``(n_keep(k, N) + extra)``-th largest ``|tau_t|`` (``extra=1``: the TALL-masks code's count)."""
    total = inp.n_float
    m = min(n_keep(k, total) + extra, total)
    buf = torch.empty(total, dtype=torch.float32)
    thresholds = []
    for t in range(inp.n):
        vals = fill_abs_task_vector(inp, t, buf, transform)
        thresholds.append(kth_largest(vals, m))
    del buf
    log.debug("TIES thresholds (k=%s, keep %d of %d): %s", k, m, total, thresholds)
    return thresholds


def ties_merge(
    inp: MergeInputs,
    k: float,
    lam: float,
    per_tensor: bool = False,
    transform: Transform | None = None,
) -> dict[str, Tensor]:
    """TIES over (optionally transformed) task vectors; ``k >= 1`` skips trimming."""
    n = inp.n
    if per_tensor and k < 1.0:

        def shrinks_for(X: Tensor, ws: Workspace) -> list[float]:
            A = ws.get("abs", X.shape[1])
            out = []
            for t in range(n):
                torch.abs(X[t], out=A)
                out.append(shrink_lambda(kth_largest(A, n_keep(k, X.shape[1]))))
            return out

        chunk: int | None | str = None
    else:
        fixed = [0.0] * n if k >= 1.0 else [shrink_lambda(v) for v in global_thresholds(inp, k, transform)]

        def shrinks_for(X: Tensor, ws: Workspace) -> list[float]:
            return fixed

        chunk = "auto"

    def combine(X: Tensor, key: str, s: int, e: int, ws: Workspace) -> Tensor:
        return ties_block(X, shrinks_for(X, ws), lam, ws)

    return stream_merge(inp, combine, transform, chunk=chunk)


def ties_block(X: Tensor, shrinks: Sequence[float], lam: float, ws: Workspace, agg: str = "mean") -> Tensor:
    """Trim (in place, ``hardshrink`` per task), elect (``+`` for a zero sum), disjoint-mean (``agg="sum"``:
    disjoint sum) an ``(n, c)`` block; times ``lam``.

    Written without bool tensors (slow on CPU): ``e = sign(sign(S) + 0.5)`` is the elected sign
    (``+1`` for ``S >= 0``), ``relu(e * X)`` keeps the agreeing magnitudes, and the count of its
    non-zeros is the number of agreeing tasks.
    """
    n, c = X.shape
    for t, lmb in enumerate(shrinks):
        if lmb == math.inf:
            X[t].zero_()
        elif lmb > 0.0:
            torch.ops.aten.hardshrink.out(X[t], lmb, out=X[t])
    S = torch.sum(X, 0, out=ws.get("S", c))
    e = torch.sign(S, out=ws.get("e", c)).add_(0.5).sign_()
    X.mul_(e).clamp_(min=0.0)  # |agreeing entries|, 0 elsewhere
    num = torch.sum(X, 0, out=S)
    if agg == "mean":
        nz = torch.ne(X, 0.0, out=ws.block("nz", n, c))
        num.div_(torch.sum(nz, 0, out=ws.get("cnt", c)).clamp_(min=1.0))
    return num.mul_(e).mul_(lam)

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
KEPT_FRACTION = fraction(low_open=True, note="the share of each task vector's |tau| kept; 0.2 keeps the top 20%")
ties_merging.ranges = {"k": KEPT_FRACTION, "scaling_coef": ONE_COEF, "per_tensor": FLAG}
