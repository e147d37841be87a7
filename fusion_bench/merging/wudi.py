r"""WUDI merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors", ICML 2025).

Definition, per optimised 2-D float key: minimise

    L(m) = sum_t ||(m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2

with Adam (the paper: lr 1e-5, 300 steps, default betas (0.9, 0.999), eps 1e-8) from
``m = sum_t tau_t``; ``theta = theta_0 + alpha * m`` (``alpha = scaling_coef = 1``).
A task whose task vector is zero on a key contributes nothing to that key's loss (the limit of its
term; the reference code would divide by zero).

Which keys (``keys``)
---------------------
* ``keys="official"`` (default): the linear maps of the transformer blocks only, every other key
  stays at ``theta_0`` (task vectors of norms, biases, embeddings, ``proj`` are dropped).  This is
  the official ViT code (nathanielyvo/WUDI-Merging, ``vit/wudi_main.py``, ``decompose_task_vectors``):
  it optimises the keys whose name contains ``attn.in_proj_weight``, ``attn.out_proj.weight``,
  ``mlp.c_fc.weight`` or ``mlp.c_proj.weight`` (open_clip's residual blocks) and
  ``TaskVector.apply_to`` loads only those with ``strict=False``, so every other key keeps its
  pretrained value.  It is the default because it is what produced the paper's CLIP tables (the
  paper's loss is derived for linear layers: their task vectors span the layer's inputs).
  For T5 (no official T5 code exists) ``official`` means the same thing, the linear maps of every
  block: ``SelfAttention`` / ``EncDecAttention`` ``q, k, v, o`` and ``DenseReluDense`` ``wi``
  (``wi_0, wi_1``), ``wo``; embeddings (``shared``, ``embed_tokens``, ``lm_head``),
  ``relative_attention_bias`` and layer norms stay at ``theta_0`` (the paper's RoBERTa script
  likewise excludes embeddings, LayerNorms, biases and heads).  A merge space without any of these
  keys (LoRA adapters: ``finetune=l_lora``, ``finetune.task_vector=adapters``) is refused with a
  message naming ``keys="all_2d"``.
* ``keys="all_2d"``: every 2-D float key (``positional_embedding`` and ``proj`` included) is
  optimised and every other float key takes ``theta_0 + alpha * mean_t tau_t``: the reference
  framework's behaviour (FusionBench), not the paper's code.

Non-float keys are copied from ``theta_0`` either way.

Fast exact form
---------------
``grad L = 2 (m A - B)`` with ``A = sum_t tau_t^T tau_t / ||tau_t||^2`` (cols x cols) and
``B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2`` (rows x cols), both fixed: they are formed once per
key (float64, then cast to the working fp32), and every Adam step costs ONE ``(rows x cols)
(cols x cols)`` product (``addmm``) instead of ``T`` products of ``(rows x cols)(cols x rows)`` in
the forward pass and again in the backward pass.  Adam is applied by hand with exactly the
operations of ``torch.optim.Adam``'s single-tensor step (lerp, mul + addcmul, sqrt / bias
correction + eps, addcdiv), so the iterates are those of ``torch.optim.Adam`` on the autograd
loss up to the round-off of the gradient.

Row blocks: row ``i`` of the gradient depends only on row ``i`` of ``m`` (``(m A)_i = m_i A``)
and Adam is elementwise, so each block of rows runs its 300 steps on its own with the same
iterates; a block's working set (``m``, ``B``, gradient and both moments) stays in cache while
``A`` is shared.

Wide keys with few tasks: when ``2 T rows < cols``, ``m A = (m S^T) S`` with
``S = [tau_1 / ||tau_1||; ...; tau_T / ||tau_T||]`` (``T rows x cols``) is cheaper than the
``cols x cols`` product (the same product re-associated).  There is no exact *transposed* form:
the loss multiplies by ``tau_t^T`` on the right only, and Adam's elementwise steps forbid a change
of basis.

The exact minimiser (``solver="exact"``)
----------------------------------------
``L`` is a convex quadratic in ``m`` and its gradient ``2 (m A - B)`` vanishes at ``m* = B A^+``: one
``cols x cols`` solve per key instead of 300 Adam steps (the paper's default, ``solver="adam"``, stays the
default: it is what produced the paper's tables).  ``A`` is positive semi-definite; a Cholesky factorisation
(float64) solves it when it is well conditioned (its pivots within ``CHOLESKY_MIN_PIVOT`` of the largest); otherwise
(a rank-deficient ``A``: fewer task-vector rows than columns, LoRA updates) the eigendecomposition gives the
pseudo-inverse, every eigenvalue above ``cols * eps * lambda_max`` kept (numerical rank, as numpy's matrix_rank):
the minimiser of least norm, whose rows lie in the span of the task vectors' rows, like ``m_0`` and ``B``.  No
ridge is added: a ridge would shrink real small directions (DESIGN.md "Facts that bite": ill-conditioned is not
null).  Wide keys (``2 T rows < cols``) solve in the small space instead: ``B = W S`` with
``W = [tau_t tau_t^T / ||tau_t||]_t``, so ``m* = W (S S^T)^+ S`` (a ``T rows x T rows`` system).
With Adam's lr 1e-5 (an absolute step) and 300 steps, ``m`` moves at most ``300 * 1e-5`` per entry from
``m_0 = sum_t tau_t``: where task vectors are large the Adam result stays near ``m_0`` while ``m*`` does not; the
log line gives the loss reached and the movement either way.

The loss before and after and ``||m - m_0|| / ||m_0||`` (over all optimised keys) are logged (INFO).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.progress import track
from torch import Tensor

from fusion_bench.validation.ranges import ONE_COEF, ListOf, choice, fraction, integer, non_negative

from .registry import merging_method
from .task_vectors import PROGRESS_MIN_NUMEL, MergeInputs, StateDict, finish, is_number, prepare, scalar_coef

log = logging.getLogger(__name__)

#: entries of ``m`` per row block of the Adam loop (measured: 1M entries is within 10% of the best
#: block for every ViT-B/32 shape; much smaller blocks starve the matrix product)
BLOCK_ELEMS = 1 << 20

#: what ``keys`` may be (module doc)
KEY_SETS = ("official", "all_2d")
#: what ``solver`` may be: the paper's Adam, or the exact minimiser ``B A^+`` (module doc)
SOLVERS = ("adam", "exact")
#: the exact solver's Cholesky path is used only when every pivot^2 is above this fraction of the largest
CHOLESKY_MIN_PIVOT = 1e-10
#: ``keys="official"`` for open_clip: the substrings the official ViT code selects keys by (``vit/wudi_main.py``)
OFFICIAL_CLIP_NAMES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
#: ``keys="official"`` for T5 (Hugging Face names): the linear maps of every encoder and decoder block
OFFICIAL_T5_NAME = re.compile(
    r"(^|\.)block\.\d+\.layer\.\d+\."
    r"(SelfAttention\.[qkvo]|EncDecAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))\.weight$"
)


@dataclass
class WUDIStats:
    """Loss and movement of one key's optimisation (losses in float64)."""

    loss_before: float
    loss_after: float
    sq_norm_start: float  # ||m_0||^2
    sq_norm_moved: float  # ||m - m_0||^2


def _quadratic(A: Tensor | None, S: Tensor | None, B: Tensor, C: float, m: Tensor) -> float:
    """``L(m) = <m, m A> - 2 <m, B> + C`` in float64 (``A`` or its factor ``S``)."""
    m = m.to(torch.float64)
    mA = (m @ S.T) @ S if S is not None else m @ A
    return float((m * mA).sum() - 2.0 * (m * B).sum()) + C


def wudi_optimise(
    taus: Sequence[Tensor],
    lr: float = 1e-5,
    iterations: int = 300,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    block_elems: int | None = None,
    solver: str = "adam",
) -> tuple[Tensor, WUDIStats]:
    """WUDI on one 2-D key (module doc): the paper's Adam, or with ``solver="exact"`` the minimiser ``B A^+``
    (computed in float64); returns ``m`` in the dtype of ``taus`` (fp32 or fp64)."""
    taus = list(taus)
    rows, cols = taus[0].shape
    wd = taus[0].dtype
    f64 = torch.float64
    norms = [float(torch.linalg.vector_norm(t, dtype=f64)) ** 2 for t in taus]
    active = [(t, n) for t, n in zip(taus, norms) if n > 0]
    m064 = torch.zeros(rows, cols, dtype=f64)
    for t in taus:
        m064.add_(t)
    B64 = torch.zeros(rows, cols, dtype=f64)
    C = 0.0
    A64 = S64 = None
    if 2 * len(active) * rows < cols:  # factored: m A = (m S^T) S
        S64 = (
            torch.cat([t.to(f64) / math.sqrt(n) for t, n in active])
            if active
            else torch.zeros(1, cols, dtype=f64)
        )
        for t, n in active:
            x = t.to(f64)
            H = x @ x.T
            B64.add_(H @ x, alpha=1.0 / n)
            C += float((H * H).sum()) / n
    else:
        A64 = torch.zeros(cols, cols, dtype=f64)
        for t, n in active:
            x = t.to(f64)
            G = x.T @ x
            A64.add_(G, alpha=1.0 / n)
            C += float((G * G).sum()) / n
            B64.add_((x @ x.T) @ x if rows < cols else x @ G, alpha=1.0 / n)
            del G
    loss0 = _quadratic(A64, S64, B64, C, m064)
    if solver == "exact":
        if S64 is not None:  # m* = W (S S^T)^+ S, W = [tau_t tau_t^T / ||tau_t||]_t
            W = torch.cat([(t.to(f64) @ t.to(f64).T) / math.sqrt(n) for t, n in active], 1) if active \
                else torch.zeros(rows, 1, dtype=f64)
            m = (_right_solve_psd(S64 @ S64.T, W) @ S64).to(wd)
        else:
            m = _right_solve_psd(A64, B64).to(wd)
    else:
        m = m064.to(wd, copy=True)  # m064 stays m_0 (the statistics below)
        A = None if A64 is None else A64.to(wd)
        S = None if S64 is None else S64.to(wd)
        _adam_rows(m, A, S, B64.to(wd), lr, iterations, betas, eps, block_elems or BLOCK_ELEMS)
    stats = WUDIStats(
        loss0,
        _quadratic(A64, S64, B64, C, m),
        float((m064 * m064).sum()),
        float(((m.to(f64) - m064) ** 2).sum()),
    )
    return m, stats


def _right_solve_psd(M: Tensor, R: Tensor) -> Tensor:
    """``R M^+`` for a symmetric positive semi-definite float64 ``M`` (module doc: Cholesky when well conditioned,
    else the eigendecomposition's pseudo-inverse at numerical rank)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        d = torch.diagonal(L) ** 2
        if float(d.min()) > CHOLESKY_MIN_PIVOT * float(d.max()):
            return torch.cholesky_solve(R.T, L).T
    lam, Q = torch.linalg.eigh(M)
    top = float(lam[-1]) if lam.numel() else 0.0
    keep = lam > M.shape[0] * torch.finfo(M.dtype).eps * top
    if not bool(keep.any()):
        return R.new_zeros(R.shape[0], M.shape[0])
    Qk = Q[:, keep]
    return ((R @ Qk) / lam[keep]) @ Qk.T


def _adam_rows(
    m: Tensor,
    A: Tensor | None,
    S: Tensor | None,
    B: Tensor,
    lr: float,
    iterations: int,
    betas: tuple[float, float],
    eps: float,
    block_elems: int,
) -> None:
    """``iterations`` Adam steps on ``m`` (in place) with ``grad = 2 (m A - B)``, block of rows by block."""
    rows, cols = m.shape
    beta1, beta2 = betas
    rb = max(1, min(rows, block_elems // max(cols, 1)))
    g = torch.empty(rb, cols, dtype=m.dtype)
    ea = torch.empty_like(g)
    eas = torch.empty_like(g)
    den = torch.empty_like(g)
    tmp = None if S is None else torch.empty(rb, S.shape[0], dtype=m.dtype)
    for r0 in range(0, rows, rb):
        r1 = min(r0 + rb, rows)
        n = r1 - r0
        p, b = m[r0:r1], B[r0:r1]
        gb, eab, easb, denb = g[:n], ea[:n], eas[:n], den[:n]
        eab.zero_()
        easb.zero_()
        for step in range(1, iterations + 1):
            # gradient 2 (m A - B): scaling by 2 is exact, so this is 2 * (m A - B) bit for bit
            if S is None:
                torch.addmm(b, p, A, beta=-2.0, alpha=2.0, out=gb)
            else:
                torch.mm(p, S.T, out=tmp[:n])
                torch.addmm(b, tmp[:n], S, beta=-2.0, alpha=2.0, out=gb)
            # torch.optim.Adam, single-tensor path (no weight decay, no amsgrad)
            eab.lerp_(gb, 1 - beta1)
            easb.mul_(beta2).addcmul_(gb, gb, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            torch.sqrt(easb, out=denb).div_(bias_correction2_sqrt).add_(eps)
            p.addcdiv_(eab, denb, value=-step_size)


def _check_args(lr, iterations, betas, eps) -> tuple[float, int, tuple[float, float], float]:
    method = "wudi_merging"
    if not is_number(lr) or float(lr) < 0:
        raise ValueError(f"{method}: lr={lr!r} must be a non-negative number (the paper: 1e-5)")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 0:
        raise ValueError(
            f"{method}: iterations={iterations!r} must be a non-negative integer (the paper: 300)"
        )
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(
            f"{method}: betas={betas!r} must be two numbers in [0, 1) (default (0.9, 0.999))"
        ) from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"{method}: betas={betas!r} must be two numbers in [0, 1) (default (0.9, 0.999))")
    if not is_number(eps) or float(eps) < 0:
        raise ValueError(f"{method}: eps={eps!r} must be a non-negative number (default 1e-8)")
    return float(lr), int(iterations), (b1, b2), float(eps)


def is_official_key(name: str) -> bool:
    """Whether ``keys="official"`` optimises the key ``name`` (an open_clip or T5 block linear map)."""
    return any(s in name for s in OFFICIAL_CLIP_NAMES) or OFFICIAL_T5_NAME.search(name) is not None


def wudi_keys(inp: MergeInputs, keys: str) -> list[str]:
    """The float keys WUDI optimises (module doc), in pretrained order; refuses an empty ``official`` set."""
    method = "wudi_merging"
    if keys not in KEY_SETS:
        raise ValueError(
            f"{method}: keys={keys!r} must be 'official' (the official code: the transformer blocks' linear maps, "
            f"every other key at theta_0) or 'all_2d' (every 2-D key, the other float keys averaged)"
        )
    two_d = [k for k in inp.float_keys if len(inp.shapes[k]) == 2]
    if keys == "all_2d":
        return two_d
    chosen = [k for k in inp.float_keys if is_official_key(k)]
    bad = [k for k in chosen if len(inp.shapes[k]) != 2]
    if bad:
        raise ValueError(
            f"{method}: keys='official' selects {bad[:3]} by name, but they are not 2-D "
            f"(shapes {[tuple(inp.shapes[k]) for k in bad[:3]]}); pass keys='all_2d' (method.keys=all_2d)"
        )
    if not chosen:
        raise ValueError(
            f"{method}: keys='official' selects none of the {len(two_d)} 2-D keys of this merge space "
            f"(e.g. {two_d[:3]}): it optimises only transformer-block linear maps named like open_clip's "
            f"{list(OFFICIAL_CLIP_NAMES)} or T5's '...SelfAttention.q.weight', '...DenseReluDense.wo.weight' "
            f"(LoRA adapters are neither); pass keys='all_2d' (method.keys=all_2d) to optimise every 2-D key"
        )
    return chosen


@merging_method("wudi", kind="data-free", affine=True)
def wudi_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float = 1.0,
    lr: float = 1e-5,
    iterations: int = 300,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    keys: str = "official",
    solver: str = "adam",
) -> dict[str, Tensor]:
    """WUDI (module doc): per optimised 2-D key, Adam on ``sum_t ||(m - tau_t) tau_t^T||^2 / ||tau_t||^2``
    from ``m = sum_t tau_t``; ``theta_0 + scaling_coef * m``.

    ``keys="official"``: the transformer blocks' linear maps are optimised, every other key stays at
    ``theta_0`` (the official code); ``keys="all_2d"``: every 2-D key, the other float keys
    ``theta_0 + scaling_coef * mean_t tau_t``.  ``solver="exact"``: the minimiser ``B A^+`` instead of Adam
    (``lr``, ``iterations``, ``betas``, ``eps`` then unused).
    """
    inp = prepare(pretrained, finetuned, "wudi_merging")
    alpha = scalar_coef(scaling_coef, "wudi_merging")
    lr, iterations, betas_, eps = _check_args(lr, iterations, betas, eps)
    if solver not in SOLVERS:
        raise ValueError(f"wudi_merging: solver={solver!r} must be one of {SOLVERS} (adam: the paper's 300 Adam "
                         f"steps; exact: the loss's minimiser B A^+)")
    optimised = set(wudi_keys(inp, keys))
    stats: list[WUDIStats] = []
    out: dict[str, Tensor] = {}
    big = inp.n_float >= PROGRESS_MIN_NUMEL
    for key in track(inp.float_keys, description="WUDI", transient=True, disable=not big):
        if inp.numels[key] == 0 or (keys == "official" and key not in optimised):
            continue  # finish() copies theta_0
        pre32 = inp.pretrained[key].to(torch.float32)
        taus = [torch.sub(ft[key], pre32).to(torch.float32) for ft in inp.finetuned]
        if key in optimised:
            upd, st = wudi_optimise(taus, lr, iterations, betas_, eps, solver=solver)
            log.debug("wudi_merging: %s loss %.6g -> %.6g", key, st.loss_before, st.loss_after)
            stats.append(st)
        else:  # keys="all_2d": the mean of the task vectors
            upd = taus[0].clone()
            for t in taus[1:]:
                upd.add_(t)
            upd.div_(len(taus))
        del taus
        out[key] = torch.add(pre32, upd, alpha=alpha).to(inp.dtypes[key])
        del upd, pre32
    if keys == "official":
        log.info(
            "wudi_merging: keys=official: %d block linear maps optimised, %d other float keys left at theta_0",
            len(optimised),
            len(inp.float_keys) - len(optimised),
        )
    if stats:
        before = sum(s.loss_before for s in stats)
        after = sum(s.loss_after for s in stats)
        start = sum(s.sq_norm_start for s in stats)
        moved = sum(s.sq_norm_moved for s in stats)
        log.info(
            "wudi_merging: %s on %d 2-D keys: loss %.6g -> %.6g, ||m - m_0|| / ||m_0|| = %.4g",
            f"Adam lr={lr:g}, {iterations} iterations" if solver == "adam" else "exact minimiser B A^+",
            len(stats),
            before,
            after,
            math.sqrt(moved / start) if start > 0 else math.nan,
        )
    return finish(inp, out)

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
wudi_merging.ranges = {
    "scaling_coef": ONE_COEF,
    "lr": non_negative("Adam's step (the paper: 1e-5)"),
    "iterations": integer(0, note="Adam steps (the paper: 300)"),
    "betas": ListOf(fraction(high_open=True), length=2),
    "eps": non_negative(),
    "keys": choice(*KEY_SETS),
    "solver": choice(*SOLVERS),
}
