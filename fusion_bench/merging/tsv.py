r"""TSV-M: Task Singular Vectors merging (Gargiulo et al., "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025).

Definition, per 2-D float key (``r = min(rows, cols)``, ``T`` tasks, ``k = floor(r / T)``):

1. ``tau_t = U_t diag(S_t) V_t^T``; keep the first ``k`` triplets of every task;
2. concatenate the kept columns: ``U = [U_1[:, :k] .. U_T[:, :k]]`` (rows x Tk), ``s`` (Tk),
   ``V = [V_1[:, :k] .. V_T[:, :k]]`` (cols x Tk);
3. replace ``U`` and ``V`` by their orthogonal polar factors (``U = P Sigma Q^T -> P Q^T``);
4. ``merged = U_perp diag(s) V_perp^T``; ``theta = theta_0 + alpha * merged`` (``alpha = 1``: the
   paper needs no validation).

Every other float key: ``theta_0 + alpha * mean_t tau_t`` (as the reference code).
``T > r`` gives ``k = 0``: that key keeps ``theta_0`` (the reference code's ``int(r / T)`` does the
same); a warning names the key.  The reference code pads the concatenation with zero columns up to
``r``: the polar factor of ``[A | 0]`` is ``[polar(A) | 0]`` on the kept part, so it is the same merge.

Fast exact form (see :mod:`~fusion_bench.merging.spectral`): per task the float64 Gram matrix of
the smaller side and its eigendecomposition give the top ``k`` triplets; the polar factors come
from the ``Tk x Tk`` Gram matrices ``U^T U`` and ``V^T V``: ``U_perp = U (U^T U)^{-1/2}``.
No full SVD of a ``rows x cols`` matrix is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import ONE_COEF

from .registry import merging_method
from .spectral import eigh_many, gram, merge_2d_keys, polar_pair, svd_from_gram
from .task_vectors import StateDict, prepare, scalar_coef

log = logging.getLogger(__name__)


@merging_method(kind="data-free", affine=True)
def tsv_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float = 1.0,
) -> dict[str, Tensor]:
    """TSV-M (module doc): per 2-D key the top ``floor(r/T)`` singular triplets of every task,
    orthogonalised jointly; ``scaling_coef`` is the paper's ``alpha`` (1.0)."""
    inp = prepare(pretrained, finetuned, "tsv_merging")
    alpha = scalar_coef(scaling_coef, "tsv_merging")
    return merge_2d_keys(inp, alpha, tsv_key, "TSV-M")


def tsv_key(taus: list[Tensor], key: str = "", noise: float = 0.0) -> Tensor:
    """TSV-M update of one 2-D key from its fp32 task vectors (fp32 result); ``noise``: the weights'
    rounding in each task vector (spectral's module doc)."""
    rows, cols = taus[0].shape
    T = len(taus)
    k = min(rows, cols) // T
    if k == 0:
        log.warning(
            "tsv_merging: key %r (%d x %d) has rank %d < %d tasks: floor(r/T) = 0 triplets per task, "
            "the key keeps its pretrained value",
            key,
            rows,
            cols,
            min(rows, cols),
            T,
        )
        return taus[0].new_zeros(rows, cols)
    X = [t.to(torch.float64) for t in taus]
    eig = eigh_many([gram(x) for x in X])
    parts = [svd_from_gram(x, L, Q, k, noise) for x, (L, Q) in zip(X, eig)]
    del X, eig
    U = torch.cat([p[0] for p in parts], 1)
    s = torch.cat([p[1] for p in parts])
    V = torch.cat([p[2] for p in parts], 1)
    del parts
    PU, PV = polar_pair(U, V)
    return (PU * s).to(torch.float32) @ PV.to(torch.float32).T

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
tsv_merging.ranges = {"scaling_coef": ONE_COEF}
