r"""Model Breadcrumbs (Davari and Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task
Model Merging with Sparse Masks").

Per float key and task, with ``n = numel``: drop the ``n_top = int(gamma * n)`` entries of largest
``|tau_t|`` (outliers) and the smallest entries so that ``n_keep = int(density * n)`` remain
(``density + gamma <= 1``); then task arithmetic ``theta = theta_0 + sum_t lambda_t * masked(tau_t)``.

Exactly: with ``hi`` the ``n_top``-th largest ``|tau_t|`` of the key (``inf`` when ``n_top = 0``) and
``lo`` the ``(n_top + n_keep)``-th largest (``inf``, i.e. keep nothing, when ``n_keep = 0``), an entry
is kept when ``lo <= |tau_t| < hi``.  Thresholds are exact (radix select as in
:func:`~fusion_bench.merging.task_vectors.kth_largest`, both ranks from one histogram pass).
With repeated magnitudes, entries equal to ``hi`` are all dropped and entries equal to ``lo``
all kept, so the counts can then differ from ``n_top`` / ``n_keep`` (zeros of a partly frozen key
are "kept" but add nothing).  0-d keys (scalars) are not masked (the official code leaves them whole).

Defaults: ``density = 0.15`` and ``gamma = 0.006``, taken from the official code
(``rezazzr/breadcrumbs``, ``find_best_hyperparam.py``, method ``middle_keep``): its search starts
at keep 0.15 after removing the top 0.006 (``alpha`` 0.2) and searches keep in 0.05-0.20 and the
top fraction in 0.001-0.01.  The paper's own text could not be consulted here; these values are
the code's.  (MergeKit's LLM presets use ``density=0.9, gamma=0.01`` instead.)  ``scaling_coef``
is searched on validation.  The official code ranks within each row (last dimension) of a
matrix; here, as DESIGN.md specifies, within the whole key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.errors import ConfigError
from fusion_bench.validation.ranges import PER_TASK_COEF, Context, fraction

from .registry import merging_method
from .task_vectors import (
    _HI,
    _LO,
    StateDict,
    Workspace,
    _select_bucket,
    is_number,
    prepare,
    scaling_coefs,
    shrink_lambda,
    stream_merge,
)


def kth_largest_pair(values: Tensor, m1: int, m2: int) -> tuple[float, float]:
    """Exact ``m1``-th and ``m2``-th largest of a flat fp32 tensor of non-negative values.

    The radix select of :func:`~fusion_bench.merging.task_vectors.kth_largest` with the
    first-level histogram (top 16 bits) shared by both ranks: two passes over ``values`` instead
    of four.  ``inf`` for a rank ``<= 0``, the minimum for a rank ``>= numel``.
    """
    if values.dtype != torch.float32 or values.dim() != 1:
        raise TypeError("kth_largest_pair expects a flat fp32 tensor")
    n = values.numel()
    ranks = [min(m, n) if m > 0 and n > 0 else 0 for m in (m1, m2)]
    live = [m for m in ranks if m > 0]
    if not live:
        return math.inf, math.inf
    bits = values.view(torch.int32)
    high = torch.bitwise_right_shift(bits, 16)
    hist = torch.bincount(high, minlength=_HI)[:_HI]
    found: dict[int, float] = {}
    for m in set(live):
        b, r = _select_bucket(hist, m)
        sel = bits[high == b].bitwise_and_(0xFFFF)
        lo, _ = _select_bucket(torch.bincount(sel, minlength=_LO), r)
        found[m] = torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return tuple(found[m] if m > 0 else math.inf for m in ranks)  # type: ignore[return-value]


def breadcrumbs_thresholds(a: Tensor, density: float, gamma: float) -> tuple[float, float]:
    """``(lo, hi)`` for one key's flat fp32 ``|tau|``: keep ``lo <= |tau| < hi`` (see module doc)."""
    n = a.numel()
    n_top = int(gamma * n)
    n_keep = int(density * n)
    hi, lo = kth_largest_pair(a, n_top, n_top + n_keep if n_keep > 0 else 0)
    return lo, hi


@merging_method(kind="data-free", affine=True)
def breadcrumbs(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    density: float = 0.15,
    gamma: float = 0.006,
    scaling_coef: float | Sequence[float] = 0.3,
) -> dict[str, Tensor]:
    """Model Breadcrumbs: per key and task keep the ``density`` fraction below the top ``gamma``; then TA.

    Args:
        density: fraction of each key's entries kept, in (0, 1].
        gamma: fraction of each key's largest-|tau| entries dropped first, in [0, 1);
            ``density + gamma <= 1``.
        scaling_coef: task arithmetic's lambda: one float or one per task.
    """
    method = "breadcrumbs"
    inp = prepare(pretrained, finetuned, method)
    if not is_number(density) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"{method}: density={density!r} (the kept fraction) must be in (0, 1]")
    if not is_number(gamma) or not (0.0 <= float(gamma) < 1.0):
        raise ValueError(f"{method}: gamma={gamma!r} (the dropped top fraction) must be in [0, 1)")
    density, gamma = float(density), float(gamma)
    if density + gamma > 1.0 + 1e-12:
        raise ValueError(
            f"{method}: density={density} + gamma={gamma} > 1: cannot keep {density:.0%} of the entries "
            f"after dropping the top {gamma:.0%}; lower one of them"
        )
    lam = torch.tensor(scaling_coefs(scaling_coef, inp.n, method), dtype=torch.float32)

    def combine(X: Tensor, key: str, s: int, e: int, ws: Workspace) -> Tensor:
        c = e - s
        if len(inp.shapes[key]) > 0:
            a = ws.get("abs", c)
            big = ws.get("big", c, torch.bool)
            for t in range(X.shape[0]):
                x = X[t]
                torch.abs(x, out=a)
                lo, hi = breadcrumbs_thresholds(a, density, gamma)
                if lo == math.inf:
                    x.zero_()
                    continue
                if hi != math.inf:
                    x.masked_fill_(torch.ge(a, hi, out=big), 0.0)
                lmb = shrink_lambda(lo)
                if lmb > 0.0:
                    torch.ops.aten.hardshrink.out(x, lmb, out=x)  # keeps |x| >= lo
        return torch.mv(X.t(), lam, out=ws.get("upd", c))

    return stream_merge(inp, combine, chunk=None)

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
def _check_breadcrumbs_settings(settings: dict, ctx: Context) -> None:
    density, gamma = settings.get("density", 0.15), settings.get("gamma", 0.006)
    if density + gamma > 1.0 + 1e-12:
        raise ConfigError(f"method.density={density} and method.gamma={gamma}: density + gamma must be <= 1 (the "
                          f"share of each key's entries kept and the share of its largest dropped first)")


breadcrumbs.ranges = {
    "density": fraction(low_open=True, note="the share of each key's entries kept"),
    "gamma": fraction(high_open=True, note="the share of the largest |tau| dropped first"),
    "scaling_coef": PER_TASK_COEF,
}
breadcrumbs.check_settings = _check_breadcrumbs_settings
