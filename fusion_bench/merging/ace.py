r"""ACE-Merging (Xu, Wu, Lin, Huang, Zhu, Shu, Qin, "ACE-Merging: Data-Free Model Merging with Adaptive Covariance
Estimation", arXiv 2603.02945, CVPR 2026): a closed-form RegMean-like merge whose input covariances are estimated from
the task vectors themselves (under a local linear approximation the rows of ``tau_t`` sample task ``t``'s inputs),
with an adaptive normalisation, a collective prior and a spectral refinement for heterogeneous keys.

Definition, per 2-D float key (``T`` tasks, ``tau_t = theta_t - theta_0`` of shape ``rows x cols``, covariances over
the ``cols`` side of the STORED tensor, as the official code does for every 2-D key, open_clip's ``proj`` included):

1. heterogeneity: ``n_t = ||tau_t||_F^2``, ``l_t = log(n_t + 1e-12)``,
   ``h = var(l) / (mean(l)^2 + 1e-12)`` (``var`` unbiased); the key is heterogeneous when ``h > threshold``
   (``0.3``; never for ``T = 1``, where the code's ``var`` is NaN);
2. per task, the row-centred task vector ``W_t = tau_t - 1 mean_rows(tau_t)`` and ``G_t = W_t^T W_t``,
   ``c_t = tr(G_t) + 1e-12``; heterogeneous: ``S_t = G_t / c_t``, ``e_t = eps / c_t``; otherwise ``S_t = G_t``,
   ``e_t = eps`` (``eps = 1e-2``);
3. collective prior: the row vector ``p = mean over rows of sum_t S_t`` (``1 x cols``; divided by ``mean_t n_t + 1e-12``
   when heterogeneous), added to EVERY ROW of ``A = sum_t (S_t + e_t I) + 1 p``;
4. ``W_0 = (sum_t W_t (S_t + e_t I)) A^{-1}`` (the centred ``W_t``);
5. heterogeneous keys only: ``R = sum_t tau_t (S_t - Sbar)`` (the UNcentred ``tau_t``; ``Sbar = sum_t (S_t + e_t I) / T``,
   eps included), ``F = R + W_0 = U diag(s) V^T``, ``k = int(r k_frac)`` (``r = min(rows, cols)``, ``k_frac = 0.3``),
   ``merged = W_0 + mean(s_1..s_k) U_k V_k^T``; otherwise ``merged = W_0``.

Every other float key (and a key named ``*text_projection*``, as the code): ``mean_t tau_t``.
``theta = theta_0 + scaling_coef * merged`` with ``scaling_coef = 1.0`` (the README: "no hyperparameter search").

Reference: unravel-xu/ACE-Merging ``src/merge/strategy.py`` (``MergeStrategy.ace_merging(eps=1e-2, k_frac=0.3)``,
identical in both stored versions), ``src/steps/step3.py`` (``scaling_coefficient`` 1.0 from ``control/config.py``),
``src/steps/step1.py`` (ViT: task vectors of every parameter of the image encoder). The paper's method section could
not be read here (only its abstract and summaries): everything above follows the official code, which is what
produced the published tables, including what reads like slips in it:

* the row-centred ``W_t`` enters both the covariance and the weighted sum (step 4): ``1^T W_0 = 0``, so the merged
  update of a non-heterogeneous key has zero column sums (each task vector's mean row is dropped);
* the prior is ``torch.mean(sum(Sigmas), dim=0, keepdim=True)``, a ``1 x cols`` row broadcast onto every row of ``A``
  (a rank-one, non-symmetric term), not the ``cols x cols`` mean covariance; heterogeneous keys divide it by the mean
  RAW trace (``||tau_t||_F^2``) although their ``S_t`` have unit trace;
* ``R`` uses the uncentred task vectors and ``Sbar`` includes the ``e_t I`` terms;
* ``h`` compares logarithms of absolute squared norms, so the heterogeneity test depends on the weights' scale.

Where this differs from the code (only where the code has no answer):

* ``k = 0`` (``r < 1 / k_frac``: keys of rank 3 or less): the code's ``mean`` of no singular values is NaN and would
  write NaN weights; here the refinement is skipped;
* the code's ``inv`` (``pinv`` on failure): here ``torch.linalg.solve`` (``A`` is invertible: ``sum_t S_t + (sum_t e_t) I``
  is positive definite and ``p = (1/cols) 1^T sum_t S_t`` makes the Sherman-Morrison denominator
  ``1 + p (sum S + E)^{-1} 1 >= 1``), least squares if it ever fails;
* ``F`` of rank below ``k`` (low-rank fine-tunes, LoRA): the code's SVD adds ``mean(s_1..s_k)`` times arbitrary
  directions of ``F``'s null space (the definition is not unique there); here triplets whose singular value is at
  the level of the weights' rounding are dropped (their ``s`` still count in the mean), as in
  :mod:`~fusion_bench.merging.spectral`;
* float64 per key (the code: the checkpoints' fp32, on the GPU).

Fast exact form: ``W_t S_t = tau_t S_t - 1 (mean_rows(tau_t) S_t)``, so one product ``tau_t S_t`` per task serves both
step 4 and ``R``; ``W_0`` by a solve, not an inverse; the top ``k`` triplets of ``F`` from the float64 Gram matrix of its
smaller side (:func:`~fusion_bench.merging.spectral.svd_from_gram`), not a full SVD. One key at a time
(:func:`~fusion_bench.merging.spectral.merge_2d_keys`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import ONE_COEF, fraction, non_negative, positive

from .registry import merging_method
from .spectral import eigh_many, gram, merge_2d_keys, svd_from_gram
from .task_vectors import StateDict, is_number, prepare, scalar_coef

TINY = 1e-12  # the official code's guards (log, traces, the heterogeneity ratio)


def ace_heterogeneity(taus: Sequence[Tensor]) -> float:
    """``h = var(l) / (mean(l)^2 + 1e-12)``, ``l_t = log(||tau_t||_F^2 + 1e-12)`` (unbiased variance; NaN for one task)."""
    logs = torch.tensor([math.log(float(t.to(torch.float64).pow(2).sum()) + TINY) for t in taus], dtype=torch.float64)
    if len(logs) < 2:
        return math.nan
    return float(logs.var() / (logs.mean() ** 2 + TINY))


def ace_key(
    taus: Sequence[Tensor],
    key: str = "",
    eps: float = 1e-2,
    k_frac: float = 0.3,
    threshold: float = 0.3,
    noise: float = 0.0,
) -> Tensor:
    """The ACE-Merging update of one 2-D key (fp32) from its task vectors (module doc); ``noise``: the weights'
    rounding in each task vector (spectral's module doc), for the refinement's null directions."""
    if "text_projection" in key:  # the official code averages it
        return torch.stack([t.to(torch.float32) for t in taus]).mean(0)
    X = [t.to(torch.float64) for t in taus]
    T = len(X)
    rows, cols = X[0].shape
    sq_norms = [float(x.pow(2).sum()) for x in X]
    het = ace_heterogeneity(X)
    flag = T >= 2 and het > threshold
    A = torch.zeros(cols, cols, dtype=torch.float64)  # sum_t (S_t + e_t I), then + the prior
    S_sum = torch.zeros(cols, cols, dtype=torch.float64)  # sum_t S_t
    B = torch.zeros(rows, cols, dtype=torch.float64)  # sum_t W_t (S_t + e_t I)
    TS = torch.zeros(rows, cols, dtype=torch.float64) if flag else None  # sum_t tau_t S_t
    for x in X:
        mu = x.mean(0, keepdim=True)
        W = x - mu
        G = W.T @ W
        c = float(torch.trace(G)) + TINY
        S, e = (G / c, eps / c) if flag else (G, eps)
        P = x @ S  # tau_t S_t
        B += P - mu @ S  # W_t S_t = tau_t S_t - 1 (mu_t S_t)
        B.add_(W, alpha=e)
        if TS is not None:
            TS += P
        S_sum += S
        A += S
        A.diagonal().add_(e)
        del G, S, P, W
    Sbar = A / T  # before the prior: the code's Sigma_sum / T
    prior = S_sum.mean(0, keepdim=True)
    if flag:
        prior = prior / (sum(sq_norms) / T + TINY)
    A = A + prior  # broadcast: onto every row
    try:
        W0 = torch.linalg.solve(A, B, left=False)  # B A^{-1}
    except RuntimeError:  # singular A cannot happen (module doc); least squares if it ever does
        W0 = torch.linalg.lstsq(A.T, B.T).solution.T
    k = int(min(rows, cols) * k_frac)
    if not flag or k == 0:
        return W0.to(torch.float32)
    F = TS - sum(X) @ Sbar + W0
    ((L, Q),) = eigh_many([gram(F)])
    scale = max(math.sqrt(n) for n in sq_norms)
    rel_noise = noise / scale if scale > 0 else 0.0
    s1 = float(L[0].clamp_min(0).sqrt())
    U, s, V = svd_from_gram(F, L, Q, k, math.sqrt(T) * rel_noise * s1)
    return (W0 + s.mean() * (U @ V.T)).to(torch.float32)


def _check_args(eps, k_frac, threshold) -> tuple[float, float, float]:
    if not is_number(eps) or not math.isfinite(float(eps)) or float(eps) <= 0:
        raise ValueError(f"ace_merging: eps={eps!r} must be a positive number (the official code: 1e-2)")
    if not is_number(k_frac) or not 0.0 <= float(k_frac) <= 1.0:
        raise ValueError(f"ace_merging: k_frac={k_frac!r} must be a fraction in [0, 1] (the official code: 0.3)")
    if not is_number(threshold) or not math.isfinite(float(threshold)) or float(threshold) < 0:
        raise ValueError(f"ace_merging: threshold={threshold!r} must be a non-negative number (the official code: 0.3)")
    return float(eps), float(k_frac), float(threshold)


@merging_method(kind="data-free", affine=True)
def ace_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float = 1.0,
    eps: float = 1e-2,
    k_frac: float = 0.3,
    threshold: float = 0.3,
) -> dict[str, Tensor]:
    """ACE-Merging (module doc): per 2-D key ``(sum_t W_t S~_t)(sum_t S~_t + prior)^{-1}`` from covariances estimated
    from the task vectors, plus an isotropic top-``k`` refinement on heterogeneous keys; other keys: the mean of the
    task vectors. ``theta_0 + scaling_coef * merged``."""
    inp = prepare(pretrained, finetuned, "ace_merging")
    alpha = scalar_coef(scaling_coef, "ace_merging")
    eps, k_frac, threshold = _check_args(eps, k_frac, threshold)
    return merge_2d_keys(inp, alpha, lambda taus, key, noise: ace_key(taus, key, eps, k_frac, threshold, noise),
                         "ACE-Merging")


# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
ace_merging.ranges = {
    "scaling_coef": ONE_COEF,
    "eps": positive("the covariances' ridge (the official code: 1e-2)"),
    "k_frac": fraction(note="the share of each key's rank refined isotropically (the official code: 0.3)"),
    "threshold": non_negative("heterogeneity above which covariances are trace-normalised (the official code: 0.3)"),
}
