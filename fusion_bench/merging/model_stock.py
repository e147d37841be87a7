r"""Model Stock (Jang et al., ECCV 2024, "Model Stock: All we need is just a few fine-tuned models").

Per float key, with ``tau_t = theta_t - theta_0`` flattened over the key and ``k`` fine-tuned models:

    cos = mean_{i < j} <tau_i, tau_j> / (||tau_i|| ||tau_j||)        (mean pairwise cosine)
    t   = k cos / (1 + (k - 1) cos)
    theta = t * mean_t theta_t + (1 - t) * theta_0  =  theta_0 + t * mean_t tau_t

No hyper-parameters and no ``scaling_coef``.  Needs ``k >= 2``.

More than two models.  The paper derives ``t`` for ``k`` models whose pairwise angles are all equal; its
official code (naver-ai/model-stock, whose public tree holds only a README; the reference framework's
implementation follows its notebook) merges two.  The mean pairwise cosine (``average="cosine"``, default)
is what the norm of the mean of the unit task vectors depends on:
``||mean_t u_t||^2 = (1 + (k - 1) cos) / k``.  The reference framework (FusionBench
``method/model_stock/model_stock.py``, ``ModelStock.run``) averages the pairwise ANGLES instead
(``average="angle"``: ``cos = cos(mean_{i<j} arccos(cos_ij))``, cosines clipped to [-1, 1]) and adds 1e-8 to
the cosine's and the ratio's denominators (not here).  For ``k = 2`` the two agree.

Undefined cases (documented choice): when any task vector of a key is zero, its cosine is
undefined (e.g. a key one fine-tune froze); that key gets ``t = 0``, i.e. keeps ``theta_0``, like a
key no fine-tune moved.  ``1 + (k - 1) cos >= 0`` always holds (``||sum_t u_t||^2 >= 0`` for the
unit vectors ``u_t``); when it is 0 (unit vectors summing to zero) ``t = 0`` as well.
``t`` is not clipped (the paper's formula; negative for negative mean cosine).

One keys-outer pass over whole keys: the ``k x k`` Gram matrix of the key's task vectors gives the
cosines (fp32 products, fp64 from there), then ``theta_0 + t * mean_t tau_t`` from the same block.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import choice

from .registry import merging_method
from .task_vectors import StateDict, Workspace, prepare, stream_merge

log = logging.getLogger(__name__)


AVERAGES = ("cosine", "angle")


def model_stock_ratio(gram: Tensor, average: str = "cosine") -> float:
    """``t`` from the ``k x k`` Gram matrix of one key's task vectors (0 for the undefined cases).

    ``average``: ``"cosine"`` (mean pairwise cosine) or ``"angle"`` (cosine of the mean pairwise angle).
    """
    k = gram.shape[0]
    g = gram.double()
    sq = torch.diagonal(g)
    if bool((sq <= 0).any()):
        return 0.0
    norms = sq.sqrt()
    cos = g / torch.outer(norms, norms)
    iu = torch.triu_indices(k, k, offset=1)
    pairs = cos[iu[0], iu[1]]
    c = float(pairs.mean() if average == "cosine" else torch.cos(torch.arccos(pairs.clamp(-1.0, 1.0)).mean()))
    denom = 1.0 + (k - 1) * c
    if denom <= 0.0:
        return 0.0
    return k * c / denom


@merging_method(kind="data-free")
def model_stock(
    pretrained: StateDict, finetuned: Sequence[StateDict], average: str = "cosine"
) -> dict[str, Tensor]:
    """Model Stock per key: ``theta_0 + t * mean_t tau_t`` with ``t`` from the mean pairwise cosine
    (``average="cosine"``) or the cosine of the mean pairwise angle (``average="angle"``, FusionBench's)."""
    if average not in AVERAGES:
        raise ValueError(f"model_stock: average={average!r} must be one of {AVERAGES}")
    inp = prepare(pretrained, finetuned, "model_stock")
    n = inp.n
    if n < 2:
        raise ValueError(
            f"model_stock: got {n} finetuned checkpoint; Model Stock needs at least 2 (the ratio t comes "
            f"from the cosine between task vectors)"
        )
    ratios: dict[str, float] = {}

    def combine(X: Tensor, key: str, s: int, e: int, ws: Workspace) -> Tensor:
        G = torch.mm(X, X.t())
        t = model_stock_ratio(G, average)
        ratios[key] = t
        w = torch.full((n,), t / n, dtype=torch.float32)
        return torch.mv(X.t(), w, out=ws.get("upd", e - s))

    out = stream_merge(inp, combine, chunk=None)
    if ratios:
        vals = torch.tensor(list(ratios.values()))
        log.info(
            "model_stock: t per key min %.4f / mean %.4f / max %.4f over %d keys (%d with t = 0)",
            vals.min(),
            vals.mean(),
            vals.max(),
            len(vals),
            int((vals == 0).sum()),
        )
    return out

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
model_stock.ranges = {"average": choice(*AVERAGES)}
