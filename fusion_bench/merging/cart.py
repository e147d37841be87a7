r"""CART: Centered Arithmetic with Rank-reduced Task vectors (Choi, Kim, Lee and Hong, "Revisiting Weight
Averaging for Model Merging", arXiv 2412.12153).

Definition (``T`` tasks, ``tau_t = theta_t - theta_0``)::

    theta_avg = theta_0 + mean_t tau_t                    (weight averaging: every float key)
    c_t       = theta_t - theta_avg = tau_t - mean_s tau_s (task vectors centred at the average)
    theta     = theta_avg + lambda * sum_t SVD_k(c_t)      (low-rank keys)
    theta     = theta_avg                                  (every other float key)

``SVD_k(c)`` is the best rank-``k`` approximation of ``c`` (its top ``k`` singular triplets), ``k =
max(1, int(rank_ratio * min(rows, cols)))``, and ``k = 0`` (nothing added) for ``rank_ratio = 0``.
It is a SUM over tasks with one coefficient ``lambda = scaling_coef`` (the official code's ``prior``), not a mean.
The other float keys get ``theta_avg``: the official code adds ``lambda * sum_t c_t`` there, and the centred task
vectors sum to zero.  Non-float keys are copied from ``theta_0``.  With ``T = 2``, ``c_2 = -c_1`` and the two
truncations cancel: CART is then weight averaging.

``theta(lambda) = theta_avg + lambda * L`` is a line through ``theta_avg``, not ``theta_0``: the method is
declared ``affine=False`` (the coefficient search merges at each grid point).

Defaults and sources
--------------------
Official code: github.com/JH-GEECS/CART, ``src/merging.py`` (``StaticMergeModule._merge_weights("CART")`` and
``_get_truncated_task_vectors``) with ``configs/CART/ViT-b-32_{8,14,20}_CART.yaml``.  Its ViT-B/32 settings:
``prior`` (lambda) 2.0 / 1.5 / 1.9 and ``initial_rank_ratio`` 0.12 / 0.16 / 0.32 for 8 / 14 / 20 tasks.
The defaults here are the 8-task ones (``scaling_coef = 2.0``, ``rank_ratio = 0.12``); for other task counts
set them from that list.  A summary of the paper reports "an optimal rank around 8%"; the paper's full text could
not be consulted here, so the defaults are the code's (the settings of the README's run commands).
The reference framework (FusionBench, tanganke/fusion_bench) has no CART.

Which keys are low-rank (``keys``)
----------------------------------
* ``keys="official"`` (default): the official code truncates a key when its name contains ``attn`` or ``mlp``
  and neither ``ln`` nor ``bias`` -- for open_clip exactly each block's ``attn.in_proj_weight``,
  ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``; the other 2-D keys
  (``positional_embedding``, ``proj``) get ``theta_avg``.  Only 2-D keys are truncated.  No official T5 code
  exists; for T5 names ``official`` also takes each block's linear maps (``SelfAttention`` / ``EncDecAttention``
  ``q, k, v, o``, ``DenseReluDense`` ``wi``, ``wi_0``, ``wi_1``, ``wo``: the same set as WUDI's ``official``).
  A merge space with none of these keys is refused with a message naming ``keys="all_2d"`` (CART would be
  plain weight averaging).
* ``keys="all_2d"``: every 2-D float key is truncated (DESIGN.md's "2-D keys"), the others get ``theta_avg``.

Fast exact form
---------------
``SVD_k(c) = c V_k V_k^T = U_k U_k^T c``: only the top-``k`` singular SUBSPACE is needed, not the singular values.
Per task the float64 Gram matrix of the smaller side (``c^T c`` for ``rows >= cols``, else ``c c^T``) is
diagonalised (:func:`~fusion_bench.merging.spectral.eigh_many`, tasks in parallel) and its top-``k``
eigenvectors ``Q_t`` give ``SVD_k(c_t) = c_t Q_t Q_t^T`` (or ``Q_t Q_t^T c_t``); the sum over tasks is ONE
product ``[c_1 Q_1 .. c_T Q_T] [Q_1 .. Q_T]^T``.  No ``rows x cols`` SVD is computed, and no ``1 / s`` appears: a
direction the data does not determine (a numerically zero singular value, a LoRA fine-tune's null space) has
``c q ~ 0`` and adds nothing, so no tolerance is needed.  The truncation itself is as well conditioned as the
gap ``s_k - s_{k+1}`` of each centred task vector allows (the plain definition's own conditioning).
``rank_ratio`` giving ``k = min(rows, cols)`` (e.g. 1.0) keeps each ``c_t`` whole: the sum is ``sum_t c_t`` (zero
up to rounding) without any eigendecomposition.  Arithmetic: centring and Gram matrices in float64, the final
products in fp32; outputs in the pretrained dtype.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import ONE_COEF, choice, fraction

from .registry import merging_method
from .spectral import eigh_submit, gram, merge_2d_keys
from .task_vectors import MergeInputs, StateDict, is_number, prepare, scalar_coef

log = logging.getLogger(__name__)

#: what ``keys`` may be (module doc)
KEY_SETS = ("official", "all_2d")
#: ``keys="official"`` for T5 (Hugging Face names): the linear maps of every encoder and decoder block
OFFICIAL_T5_NAME = re.compile(
    r"(^|\.)block\.\d+\.layer\.\d+\."
    r"(SelfAttention\.[qkvo]|EncDecAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))\.weight$"
)


def is_official_key(name: str) -> bool:
    """The official code's rule (``("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)``), and
    T5's block linear maps (module doc)."""
    literal = ("attn" in name or "mlp" in name) and not ("ln" in name or "bias" in name)
    return literal or OFFICIAL_T5_NAME.search(name) is not None


def cart_rank(r: int, rank_ratio: float) -> int:
    """Triplets kept of a key of rank ``r``: ``max(1, int(rank_ratio * r))``, 0 for ``rank_ratio == 0`` (the
    official code's ``parsed_dim``)."""
    if rank_ratio == 0.0:
        return 0
    return min(r, max(1, int(rank_ratio * r)))


def cart_keys(inp: MergeInputs, keys: str) -> list[str]:
    """The keys CART truncates (module doc), in pretrained order; refuses an empty ``official`` set."""
    if keys not in KEY_SETS:
        raise ValueError(
            f"cart: keys={keys!r} must be 'official' (the official code: keys named like attn / mlp weights) or "
            f"'all_2d' (every 2-D key)"
        )
    two_d = [k for k in inp.float_keys if len(inp.shapes[k]) == 2]
    if keys == "all_2d":
        return two_d
    chosen = [k for k in two_d if is_official_key(k)]
    if two_d and not chosen:
        raise ValueError(
            f"cart: keys='official' selects none of the {len(two_d)} 2-D keys of this merge space (e.g. "
            f"{two_d[:3]}): the official code truncates keys named like open_clip's '...attn.in_proj_weight', "
            f"'...mlp.c_fc.weight' (or T5's '...SelfAttention.q.weight'), and CART would be plain weight "
            f"averaging; pass keys='all_2d' (method.keys=all_2d) to truncate every 2-D key"
        )
    return chosen


@merging_method(kind="data-free", affine=False)
def cart(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float = 2.0,
    rank_ratio: float = 0.12,
    keys: str = "official",
) -> dict[str, Tensor]:
    """CART (module doc): ``theta_avg + scaling_coef * sum_t SVD_k(theta_t - theta_avg)`` on the truncated keys,
    ``theta_avg`` elsewhere; ``k = max(1, int(rank_ratio * min(rows, cols)))``.

    Args:
        scaling_coef: lambda (the official code's ``prior``; 2.0 for 8 tasks).
        rank_ratio: the share of each key's rank kept, in [0, 1] (0.12 for 8 tasks).
        keys: ``"official"`` (attn / mlp weights, as the official code) or ``"all_2d"``.
    """
    inp = prepare(pretrained, finetuned, "cart")
    lam = scalar_coef(scaling_coef, "cart")
    if not is_number(rank_ratio) or not (0.0 <= float(rank_ratio) <= 1.0):
        raise ValueError(
            f"cart: rank_ratio={rank_ratio!r} must be a fraction in [0, 1] (the share of each key's rank kept; "
            f"the official 8-task setting: 0.12)"
        )
    ratio = float(rank_ratio)
    truncated = set(cart_keys(inp, keys))
    ranks: list[tuple[int, int]] = []

    def two_d(taus: list[Tensor], key: str, noise: float) -> Tensor | Callable[[], Tensor]:
        if key not in truncated:
            return _mean(taus)
        rows, cols = taus[0].shape
        k = cart_rank(min(rows, cols), ratio)
        ranks.append((k, min(rows, cols)))
        return cart_key(taus, k, lam)

    out = merge_2d_keys(inp, 1.0, two_d, "CART")
    if ranks:
        log.info(
            "cart: rank_ratio=%g: %d keys truncated (kept rank %s), %d other float keys at the weight average",
            ratio,
            len(ranks),
            ", ".join(sorted({f"{k} of {r}" for k, r in ranks})),
            len(inp.float_keys) - len(ranks),
        )
    return out


def _mean(taus: list[Tensor]) -> Tensor:
    upd = taus[0].clone()
    for t in taus[1:]:
        upd.add_(t)
    return upd.div_(len(taus))


def cart_key(taus: list[Tensor], k: int, lam: float = 1.0) -> Tensor | Callable[[], Tensor]:
    """``mean_t tau_t + lam * sum_t SVD_k(tau_t - mean_s tau_s)`` of one 2-D key (fp32), from the fp32 task
    vectors; a continuation when eigendecompositions run (their ``eigh`` overlaps the next key's loading)."""
    rows, cols = taus[0].shape
    T = len(taus)
    X = [t.to(torch.float64) for t in taus]
    mean = X[0].clone()
    for x in X[1:]:
        mean.add_(x)
    mean.div_(T)
    C = [x.sub_(mean) for x in X]  # centred, float64 (in place: X is ours)
    avg = mean.to(torch.float32)
    if k == 0:
        return avg
    if k >= min(rows, cols):  # each c_t kept whole: the sum of the centred task vectors (zero up to rounding)
        total = C[0].clone()
        for c in C[1:]:
            total.add_(c)
        return avg.add_(total.to(torch.float32), alpha=lam)
    futures = eigh_submit([gram(c) for c in C])

    def done() -> Tensor:
        tall = rows >= cols
        left, right = [], []
        for c, fut in zip(C, futures):
            _, Q = fut.result()
            Qk = Q[:, :k].to(torch.float32)  # top-k eigenvectors (L descending)
            c32 = c.to(torch.float32)
            if tall:  # SVD_k(c) = (c Q_k) Q_k^T
                left.append(c32 @ Qk)
                right.append(Qk)
            else:  # SVD_k(c) = Q_k (c^T Q_k)^T
                left.append(Qk)
                right.append(c32.T @ Qk)
        low_rank = torch.cat(left, 1) @ torch.cat(right, 1).T
        return avg.add_(low_rank, alpha=lam)

    return done


# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
cart.ranges = {
    "scaling_coef": ONE_COEF,
    "rank_ratio": fraction(note="the share of each key's rank kept (official 8 tasks: 0.12)"),
    "keys": choice(*KEY_SETS),
}
