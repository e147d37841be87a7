r"""Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025).

Per 2-D float key, ``r = min(rows, cols)``, ``T`` tasks, ``M = sum_t tau_t = U diag(s) V^T``:

* **Iso-C**: ``merged = mean(s) * U V^T`` (all ``r`` singular values replaced by their mean);
* **Iso-CTS**: common size ``c = int(f r)`` (``f = common_space_fraction = 0.8``); the task budget
  ``r - c`` is rounded to a multiple of ``T`` (``T * round((r - c) / T)``, Python's round as in the
  reference code, capped at ``T * floor(r / T)``), ``d`` = budget / ``T`` per task and ``c = r - T d``;
  common part: the top ``c`` triplets of ``M``; task part: for each task the top ``d`` triplets of
  ``tau_t - U_c U_c^T tau_t``; concatenate ``[task parts, common part]`` (``r`` columns), replace
  ``U`` and ``V`` by their orthogonal polar factors, all singular values by their mean:
  ``merged = mean(s) * U_perp V_perp^T``.

``theta = theta_0 + alpha * merged``, ``alpha`` (``scaling_coef``) chosen on validation.
Every other float key: ``theta_0 + alpha * mean_t tau_t``.

Fast exact forms (see :mod:`~fusion_bench.merging.spectral`; float64 Gram matrices of the
smaller side, no SVD of a ``rows x cols`` matrix):

* Iso-C: ``U V^T = M (M^T M)^{-1/2}`` (or ``(M M^T)^{-1/2} M`` when ``rows < cols``): one Gram
  matrix, one ``r x r`` eigendecomposition and one product per key when ``M`` is well conditioned;
  otherwise a QR of ``M`` and the SVD of its ``r x r`` factor (spectral's module doc: no direction of
  ``M`` is dropped unless fp32 data cannot determine it).
* Iso-CTS, ``rows <= cols`` (square keys too): ``eigh(M M^T)`` gives all of ``U``; its trailing ``r - c`` eigenvectors
  ``U_perp`` span the complement of ``U_c`` exactly, so ``tau_t - U_c U_c^T tau_t = U_perp Y_t``
  with ``Y_t = U_perp^T tau_t`` (``(r - c) x cols``) and the task triplets come from the tiny
  ``(r - c) x (r - c)`` Gram matrix ``Y_t Y_t^T``.
* Iso-CTS, ``rows > cols``: the ``cols x cols`` Gram matrix of the projected task vector is
  ``tau_t^T tau_t - Z_t^T Z_t`` with ``Z_t = U_c^T tau_t`` (``U_c^T U_c = I``), without forming
  the projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import ONE_COEF, fraction

from .registry import merging_method
from .spectral import (
    eig_triplets,
    eigh_many,
    eigh_submit,
    gram,
    merge_2d_keys,
    polar_from_eigh,
    polar_pair,
    svd_from_gram,
)
from .task_vectors import StateDict, is_number, prepare, scalar_coef


@merging_method(kind="data-free", affine=True)
def iso_c(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float = 1.0,
) -> dict[str, Tensor]:
    """Iso-C (module doc): the spectrum of ``sum_t tau_t`` flattened to its mean, per 2-D key."""
    inp = prepare(pretrained, finetuned, "iso_c")
    alpha = scalar_coef(scaling_coef, "iso_c")
    return merge_2d_keys(inp, alpha, iso_c_key, "Iso-C")


@merging_method(kind="data-free", affine=True)
def iso_cts(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float = 1.0,
    common_space_fraction: float = 0.8,
) -> dict[str, Tensor]:
    """Iso-CTS (module doc): common subspace of ``sum_t tau_t`` plus ``d`` task-specific directions per task."""
    inp = prepare(pretrained, finetuned, "iso_cts")
    alpha = scalar_coef(scaling_coef, "iso_cts")
    f = common_space_fraction
    if not is_number(f) or not (0.0 <= float(f) <= 1.0):
        raise ValueError(
            f"iso_cts: common_space_fraction={f!r} must be a fraction in [0, 1] (the paper: 0.8)"
        )
    f = float(f)
    return merge_2d_keys(inp, alpha, lambda taus, key, noise: iso_cts_key(taus, f, noise), "Iso-CTS")


def _sum64(taus: list[Tensor]) -> Tensor:
    """``sum_t tau_t`` in float64 (the definition; an fp32 sum's rounding moves Iso-CTS's common
    subspace by up to 1e-5 where the spectrum of the sum has small gaps)."""
    M = taus[0].to(torch.float64)
    for t in taus[1:]:
        M.add_(t.to(torch.float64))
    return M


def iso_c_key(taus: list[Tensor], key: str = "", noise: float = 0.0) -> Callable[[], Tensor]:
    """Iso-C update of one 2-D key (fp32), as a continuation (its ``eigh`` runs meanwhile); ``noise``:
    the weights' rounding in each task vector (spectral's module doc)."""
    M = _sum64(taus)
    (fut,) = eigh_submit([gram(M)])

    def done() -> Tensor:
        L, Q = fut.result()
        mean_s = L.clamp_min(0).sqrt().mean()
        return polar_from_eigh(M, L, Q, noise=len(taus) ** 0.5 * noise).mul_(mean_s).to(torch.float32)

    return done


def iso_cts_sizes(r: int, T: int, common_space_fraction: float) -> tuple[int, int]:
    """``(c, d)`` with ``c + T d = r`` (module doc)."""
    c = int(r * common_space_fraction)
    budget = min(round((r - c) / T) * T, (r // T) * T)
    d = budget // T
    return r - T * d, d


def iso_cts_key(
    taus: list[Tensor], common_space_fraction: float = 0.8, noise: float = 0.0
) -> Callable[[], Tensor]:
    """Iso-CTS update of one 2-D key (fp32), as a continuation (the common-space ``eigh`` runs meanwhile)."""
    rows_side = taus[0].shape[0] <= taus[0].shape[1]  # square keys too: then U_perp has r - c columns
    M = _sum64(taus)
    (fut,) = eigh_submit([M @ M.T if rows_side else M.T @ M])
    return lambda: _iso_cts_finish(taus, M, fut.result(), rows_side, common_space_fraction, noise)


def _iso_cts_finish(
    taus: list[Tensor],
    M: Tensor,
    eig: tuple[Tensor, Tensor],
    rows_side: bool,
    common_space_fraction: float,
    noise: float,
) -> Tensor:
    rows, cols = M.shape
    r, T = min(rows, cols), len(taus)
    c, d = iso_cts_sizes(r, T, common_space_fraction)
    L, Q = eig
    sc, Qc, inv_c = eig_triplets(L, Q, c, M.shape, len(taus) ** 0.5 * noise)
    if rows_side:
        Uc, Vc = Qc, (M.T @ Qc) * inv_c
    else:
        Uc, Vc = (M @ Qc) * inv_c, Qc
    del M
    X = [t.to(torch.float64) for t in taus]
    task_parts: list[tuple[Tensor, Tensor, Tensor]] = []
    if d > 0 and rows_side:
        # U_perp: every eigenvector of M M^T outside the VALID common directions (numerically zero
        # common directions are not projected out; see spectral's module doc)
        Uperp = torch.cat([Q[:, :c][:, inv_c == 0], Q[:, c:]], 1)
        Y = [Uperp.T @ x for x in X]
        for y, (Ly, Qy) in zip(Y, eigh_many([gram(y) for y in Y])):
            a, s, v = svd_from_gram(y, Ly, Qy, d, noise)
            task_parts.append((Uperp @ a, s, v))
    elif d > 0:
        Z = [Uc.T @ x for x in X]
        for x, z, (Lt, Qt) in zip(X, Z, eigh_many([x.T @ x - z.T @ z for x, z in zip(X, Z)])):
            # triplets of W_t = x - Uc z (never formed): v from eigh(W_t^T W_t), u = W_t v / s
            s, v, inv = eig_triplets(Lt, Qt, d, x.shape, noise)
            task_parts.append(((x @ v - Uc @ (z @ v)) * inv, s, v))
    del X
    U = torch.cat([p[0] for p in task_parts] + [Uc], 1)
    s = torch.cat([p[1] for p in task_parts] + [sc])
    V = torch.cat([p[2] for p in task_parts] + [Vc], 1)
    PU, PV = polar_pair(U, V)
    return (PU.mul_(s.mean())).to(torch.float32) @ PV.to(torch.float32).T

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
iso_c.ranges = {"scaling_coef": ONE_COEF}
iso_cts.ranges = {"scaling_coef": ONE_COEF,
                  "common_space_fraction": fraction(note="the share of each key's rank for the common subspace")}
