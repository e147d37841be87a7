r"""SVC, Singular Value Calibration (Li, Peng, Zhang, Guo, Duan, Shi, "When Shared Knowledge Hurts: Spectral
Over-Accumulation in Model Merging", arXiv 2602.05536, ICML 2026): a post-processing step on ANY merge that gives
one model. It rescales the singular values of each 2-D merged update, using the task vectors, and keeps its
singular vectors.

Definition, per calibrated 2-D key (``T`` tasks, ``tau_t = theta_t - theta_0``, ``M = theta_merged - theta_0`` the
merged update, whatever method and coefficient made it, ``r = min(rows, cols)``):

1. ``M = U diag(sigma) V^T`` (thin SVD, all ``r`` triplets);
2. subspace responses, rows of length ``cols``: merged ``a_r^M = u_r^T M`` (``= sigma_r v_r^T``), task
   ``a_r^t = u_r^T tau_t``;
3. projection coefficients ``s_r^t = <a_r^M, a_r^t> / max(||a_r^t||^2, 1e-12)`` (the floor is absolute, as in both
   codes: a task with no response along ``u_r`` gets ``s = 0``);
4. calibration ``gamma_r = T / sum_t max(alpha, s_r^t)`` (in ``(0, 1/alpha]``: a direction the merge over-counts,
   ``s > 1``, shrinks; one it under-represents grows, up to ``1/alpha``);
5. ``theta = theta_0 + U diag(gamma * sigma) V^T``.

Keys (``keys``): ``official`` (default): every 2-D float key whose name contains neither ``embedding`` nor
``text_projection`` (the official code's filter; open_clip's ``positional_embedding`` is left alone);
``all_2d``: every 2-D float key (FusionBench's). Every other key keeps the merged value.

Defaults. ``alpha = "1/T"``: the official ``run.sh`` that produced the vision table runs every base method with
``alpha = 1/K`` (0.125 for eight tasks), except TSV-M with ``alpha = 1.0`` (``method.svc.alpha=1.0``). The README's
table says 0.1, the argparse default is 1; FusionBench's configs use 0.1 (TA, TIES, DARE, Iso-C, average), 0.2 (Iso-CTS),
1.0 (TSV-M, WUDI). A number sets it; ``"1/T"`` follows the number of tasks.

References: lyymuwu/SVC ``merge_func.py`` (``coef_cal_multi_ranks``, ``Align``, ``layer_wise_Align``), ``main.py``,
``run.sh``; tanganke/fusion_bench ``fusion_bench/method/singular_value_calibration/utils.py``
(``subspace_consistency_spectral_calibration[_accelerated]``), ``svc.py``, ``config/method/singular_value_calibration/``.
Paper and code, and the choices made here:

* aggregation: the official code's "Method Correction" commit (da4d9c2, 2026-03-18) replaced
  ``eta_r = max(mean_t s_r^t, alpha)`` if every ``s_r^t > 0`` else ``1`` by ``eta_r = mean_t max(s_r^t, alpha)``,
  ``sigma_r -> sigma_r / eta_r``; the current official code and FusionBench both use the latter (step 4), which is
  what is implemented. arXiv v1 (2026-02-05) predates the correction; the paper's text was not readable here.
* basis: the task responses use the MERGED update's left singular vectors (FusionBench's first version used each
  task's own and was corrected to this);
* the merge's own coefficient is inside ``M`` (the official ``TA`` is ``0.3 sum_t tau_t``, then ``scaling_coef = 1``):
  SVC calibrates ``theta_0 + c tau_m``, not ``tau_m``;
* the official code also has a row-space variant (``--right_only``, off in ``main.py``) and a single-task variant
  (``--target``, off): not implemented;
* computed in float64 (FusionBench's accelerated version too; the official code in fp32 on the GPU).

How it plugs in: one option, ``method.svc`` (``post=svc`` adds it with these defaults: conf/post/svc.yaml), read by
the merge stage (fusion_bench/stages/merge.py, ``Method``): the method's merge, then :func:`svc_calibrate`, for every
merge the pipeline asks for. It is refused (:func:`svc_refusal`, before any work) for task-specific methods (TALL masks,
EMR: no single merged model), for learnt coefficients (``coefficients=adamerging|lorahub`` learn them for the merge
without SVC) and for LoRA-adapter merge spaces (their 2-D keys are adapter factors, not weight updates).

The coefficient search: SVC is not affine in the merge's coefficient. With ``M(c) = c M(1)`` the singular vectors and
the task responses do not move, ``s_r^t(c) = c s_r^t(1)``, and
``SVC(c) = c U diag(gamma(c) sigma) V^T`` with ``gamma_r(c) = T / sum_t max(alpha, c s_r^t(1))``: a direction where
every ``c s_r^t >= alpha`` is calibrated to ``U diag(T sigma / sum_t s_r^t) V^T`` whatever ``c`` (SVC undoes the
scale there), the others move with ``c`` (non-linearly once a clamp switches). So ``method.svc`` makes any method
non-affine (``Method.affine`` is False) and ``scaling_coef: search`` merges, and calibrates, at every grid point (21
merges instead of one). A cheaper exact search would keep ``U``, ``sigma V^T`` and ``s_r^t(1)`` of every key and
recompute only ``gamma(c)``; it is not done (it needs a non-affine "line" in the search machinery).

Fast exact form (float64; :mod:`~fusion_bench.merging.spectral` explains why a float64 Gram matrix is exact at fp32
resolution). No SVD of the ``rows x cols`` update:

* ``rows <= cols``: ``eigh(M M^T) = U diag(sigma^2) U^T`` gives ALL of ``U`` (a complete orthonormal basis, also where
  ``sigma = 0``); ``B = U^T M`` holds the merged responses, ``A_t = U^T tau_t`` the task responses, and
  ``U diag(gamma sigma) V^T = U diag(gamma) B``: no division by ``sigma``;
* ``rows > cols``: ``eigh(M^T M) = V diag(sigma^2) V^T``, ``P = M V = U diag(sigma)``; ``D_t = P^T tau_t`` has rows
  ``sigma_r a_r^t``, so ``<a_r^M, a_r^t> = <v_r, D_t[r]>`` and ``||a_r^t||^2 = ||D_t[r]||^2 / sigma_r^2``; the result is
  ``P diag(gamma) V^T``.

A direction with ``sigma_r = 0`` contributes ``gamma_r * 0`` whatever its basis vector, and ``gamma <= 1/alpha``, so
rank-deficient updates are exact too. SVC reads individual singular vectors (not only subspaces): inside a cluster of
equal singular values the definition itself depends on the SVD's choice of basis, as it does in the reference codes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from rich.progress import track
from torch import Tensor

from fusion_bench.errors import ConfigError

from .spectral import eigh_many
from .task_vectors import PROGRESS_MIN_NUMEL, StateDict, is_number, prepare

log = logging.getLogger(__name__)

#: what ``keys`` may be (module doc)
KEY_SETS = ("official", "all_2d")
#: ``keys="official"``: 2-D keys whose name contains one of these are left alone (the official code's filter)
OFFICIAL_SKIP = ("embedding", "text_projection")
#: the floor of ``||a_r^t||^2`` (both codes' ``clamp_min(1e-12)``)
DEN_FLOOR = 1e-12
#: ``alpha="1/T"``: one over the number of tasks (the official run.sh)
PER_TASK_ALPHA = "1/T"
DEFAULTS: dict[str, Any] = {"alpha": PER_TASK_ALPHA, "keys": "official"}

#: the settings of the ``method.svc`` block: their ranges are fusion_bench.validation.options.SVC_RANGES


# --------------------------------------------------------------------------------------------
# one key
# --------------------------------------------------------------------------------------------
def _eigh_desc(G: Tensor) -> tuple[Tensor, Tensor]:
    ((L, Q),) = eigh_many([G])
    return L, Q


def _gamma(num: Tensor, den: Tensor, alpha: float) -> Tensor:
    """``gamma_r = T / sum_t max(alpha, s_r^t)`` from ``(T, r)`` numerators and ``||a_r^t||^2``."""
    s = num / den.clamp_min(DEN_FLOOR)
    return num.shape[0] / s.clamp_min(alpha).sum(0)


def svc_key(M: Tensor, taus: Sequence[Tensor], alpha: float) -> Tensor:
    """The calibrated update of one 2-D key (float64): ``M`` the merged update, ``taus`` the task vectors (module
    doc, fast exact form)."""
    M = M.to(torch.float64)
    X = [t.to(torch.float64) for t in taus]
    rows, cols = M.shape
    if rows <= cols:
        _, U = _eigh_desc(M @ M.T)
        B = U.T @ M  # row r: sigma_r v_r^T
        num, den = [], []
        for x in X:
            A = U.T @ x  # row r: a_r^t
            num.append((A * B).sum(1))
            den.append((A * A).sum(1))
        gamma = _gamma(torch.stack(num), torch.stack(den), alpha)
        return U @ (gamma[:, None] * B)
    L, V = _eigh_desc(M.T @ M)
    sig2 = L.clamp_min(0)
    P = M @ V  # column r: sigma_r u_r
    nonzero = sig2 > 0
    inv_sig2 = torch.where(nonzero, 1.0 / torch.where(nonzero, sig2, 1.0), 0.0)
    num, den = [], []
    for x in X:
        D = P.T @ x  # row r: sigma_r a_r^t
        num.append(torch.where(nonzero, (D * V.T).sum(1), 0.0))
        den.append((D * D).sum(1) * inv_sig2)
    gamma = _gamma(torch.stack(num), torch.stack(den), alpha)
    return (P * gamma) @ V.T


# --------------------------------------------------------------------------------------------
# settings and where SVC is defined
# --------------------------------------------------------------------------------------------
def svc_alpha(alpha: Any, n_tasks: int) -> float:
    """``alpha`` as a number (``"1/T"``: ``1 / n_tasks``); ValueError for anything else."""
    if alpha == PER_TASK_ALPHA:
        return 1.0 / n_tasks
    if not is_number(alpha) or not float(alpha) > 0 or float(alpha) == float("inf"):
        raise ValueError(f"svc: alpha={alpha!r} must be a positive number or {PER_TASK_ALPHA!r} (the official run.sh: "
                         f"1/T; 1.0 after TSV-M)")
    return float(alpha)


def svc_keys(shapes: Mapping[str, torch.Size], dtypes: Mapping[str, torch.dtype], keys: str) -> list[str]:
    """The keys SVC calibrates (module doc), in the given order."""
    if keys not in KEY_SETS:
        raise ValueError(f"svc: keys={keys!r} must be 'official' (2-D keys without 'embedding' or 'text_projection' in "
                         f"their name, the official code) or 'all_2d' (every 2-D key)")
    two_d = [k for k, s in shapes.items() if len(s) == 2 and dtypes[k].is_floating_point]
    if keys == "all_2d":
        return two_d
    return [k for k in two_d if not any(word in k for word in OFFICIAL_SKIP)]


def svc_refusal(fn: Callable, *, adapters: bool = False, strategy: str = "grid") -> str | None:
    """Why SVC cannot follow the merging function ``fn`` in this run (None: it can; module doc)."""
    from .registry import methods

    func = getattr(fn, "func", fn)
    kinds = {s.kind for s in methods().values() if s.function is func}
    if "task-specific" in kinds:
        return (f"{func.__name__} is task-specific (a shared vector and per-task masks, one model per task), while SVC "
                f"calibrates the one merged model of a merge")
    if strategy != "grid":
        return (f"coefficients={strategy} learns the merge's coefficients for the merge without SVC; SVC composes with "
                f"coefficients=grid (a fixed scaling_coef or scaling_coef: search)")
    if adapters:
        return ("this fine-tuning mode merges LoRA adapters (finetune=l_lora, or lora with task_vector=adapters): their "
                "2-D keys are adapter factors, not weight updates, so their singular values mean nothing to SVC; use "
                "finetune=lora with task_vector=delta_w")
    return None


def svc_options(block: Mapping | None, fn: Callable) -> dict[str, Any] | None:
    """``method.svc`` as :func:`svc_calibrate`'s keyword arguments (defaults filled in), or None when absent;
    ConfigError naming ``method.svc`` where SVC cannot follow ``fn`` or a setting is unknown."""
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ConfigError(f"method.svc={block!r}: must be a block of settings ({', '.join(DEFAULTS)}), or null")
    unknown = sorted(set(block) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"method.svc.{unknown[0]}: SVC has no setting {unknown[0]!r}; its settings are "
                          f"{', '.join(DEFAULTS)}")
    why = svc_refusal(fn)
    if why is not None:
        raise ConfigError(f"method.svc: {why}; drop method.svc (post=svc)")
    return {**DEFAULTS, **dict(block)}


# --------------------------------------------------------------------------------------------
# the whole merge, key by key
# --------------------------------------------------------------------------------------------
def svc_calibrate(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    merged: Mapping[str, Tensor],
    alpha: float | str = PER_TASK_ALPHA,
    keys: str = "official",
) -> dict[str, Tensor]:
    """SVC (module doc) of the merge ``merged`` of ``finetuned`` over ``pretrained``: each calibrated 2-D key is
    recomputed from its merged update and the task vectors, one key at a time (the ``T`` task vectors of that key
    loaded at once); every other key is the merged one. Returns a new dict in ``merged``'s dtypes and key order."""
    inp = prepare(pretrained, finetuned, "svc")
    if not isinstance(merged, Mapping):
        raise TypeError(f"svc: the merge is a {type(merged).__name__}, not one model's weights (a task-specific merge "
                        f"gives one model per task); SVC calibrates a single merged model")
    a = svc_alpha(alpha, inp.n)
    missing = [k for k in inp.keys if k not in merged]
    extra = [k for k in merged if k not in inp.shapes]
    if missing or extra:
        what = (f"lacks the key {missing[0]!r} of the pretrained checkpoint" if missing
                else f"has the key {extra[0]!r}, which the pretrained checkpoint has not")
        raise ValueError(f"svc: the merge {what}; a merge has the pretrained checkpoint's keys")
    for k in inp.float_keys:
        if tuple(merged[k].shape) != tuple(inp.shapes[k]):
            raise ValueError(f"svc: key {k!r} has shape {tuple(merged[k].shape)} in the merge but "
                             f"{tuple(inp.shapes[k])} in the pretrained checkpoint")
    chosen = [k for k in svc_keys(inp.shapes, inp.dtypes, keys) if inp.numels[k] > 0]
    if not chosen:
        two_d = [k for k in inp.float_keys if len(inp.shapes[k]) == 2]
        raise ValueError(f"svc: keys={keys!r} selects none of the {len(two_d)} 2-D keys of this merge space "
                         f"{two_d[:3]}: SVC calibrates 2-D weight updates" +
                         ("; keys='all_2d' includes those named like embeddings" if two_d else ""))
    out = dict(merged)
    big = inp.n_float >= PROGRESS_MIN_NUMEL
    for key in track(chosen, description="SVC", transient=True, disable=not big):
        pre = inp.pretrained[key].to(torch.float64)
        M = merged[key].to(torch.float64) - pre
        taus = [ft[key].to(torch.float64) - pre for ft in inp.finetuned]
        out[key] = (pre + svc_key(M, taus, a)).to(merged[key].dtype)
        del pre, M, taus
    log.info("svc: alpha=%g, %d of %d float keys calibrated (keys=%s)", a, len(chosen), len(inp.float_keys), keys)
    return {k: out[k] for k in merged}
