r"""LOT Merging (Sun, Li, Wang, Liu, Geng and Li, "Towards Minimizing Feature Drift in Model Merging: Layer-wise
Task Vector Fusion for Adaptive Knowledge Integration", NeurIPS 2025, arXiv 2505.23859).

Per layer, the one task vector ``T`` that minimises the drift of the layer's output from every fine-tune's, on each
task's exemplars fed through that task's own fine-tune (Algorithm 1: ``X^{l+1}_k = f(X^l_k; W_0 + T_k)``), each
parameter read as its own layer (a linear map's weight and its bias are two):

* linear map ``y = W x`` (``W``: ``[out, in]``; every map :func:`~fusion_bench.statistics.input_grams` finds: open_clip's
  packed ``in_proj_weight`` (Q, K and V read the same input), ``out_proj``, the MLP's ``c_fc`` / ``c_proj``, ``x @ proj``
  with ``W = proj^T``; T5's ``q k v o wi wo``): ``min_T sum_t ||X_t (T - tau_t)^T||^2`` (Eq. 8), whose minimum-norm
  solution (Eq. 9) is

      T^T = (sum_t G_t)^+ sum_t G_t tau_t^T          G_t = the input Gram of task t's fine-tune ([in, in])

  with ``+`` the Moore-Penrose inverse, taken where ``sum_t G_t`` is singular (fewer exemplar rows than inputs);
  the directions no exemplar reaches get ``T = 0``: the pretrained weight stays there (the paper's Sec. 5.2 point
  against solving for ``W`` itself, as RegMean does).  With an invertible ``sum_t G_t`` and ``scaling_coef = 1``
  this is RegMean at ``reduce_non_diagonal_ratio = 1``.
* normalisation scale ``y = w * x_hat + b`` (LayerNorm, T5's RMS norm): ``min_T sum_t sum_x ||x_hat * (T - tau_t)||^2``
  (Eq. 11), per dimension (Eq. 12) ``T[d] = sum_t m_t[d] tau_t[d] / sum_t m_t[d]``, ``m_t[d]`` the mean of
  ``x_hat[d]^2`` over task ``t``'s positions (``input_grams(..., norm_scales=True)``); ``T[d] = 0`` where every
  ``m_t[d]`` is 0.
* element-wise addition (biases, LayerNorm shifts; the embeddings added to the tokens): ``min_T sum_t n_t ||T -
  tau_t||^2`` (Eq. 13-14): the mean of the task vectors (every task weighs alike, see below).
* every other float key (what has no statistic: conv1, the token embedding, T5's relative attention bias): the mean
  of the task vectors, as the official code initialises its merged vector (``sum(task_vectors) / K``).

``theta = theta_0 + lambda * T`` for every float key (Eq. 15), ``lambda = scaling_coef``; integer / bool buffers come
from ``pretrained``; outputs have the pretrained dtypes.  Affine in ``lambda`` (``T`` does not depend on it).
Arithmetic: the mean keys in fp32 streaming key by key; a linear map's system in fp64 (:func:`regmean.gram_system`,
shared with RegMean), its pseudo-inverse through ``eigh`` of the summed Gram.

Defaults and where the paper and the code differ (which this follows)
-------------------------------------------------------------------
The official repository (github.com/SunWenJu123/model-merging, ``lot_merging_utils.py``) could not be fetched here;
what is known of it comes from the paper (its Algorithm 1, Eq. 9/12/14, Sec. 6) and from a third party's line-by-line
port of that file (for an LLM) that quotes its lines.  From those:

* features: each task's exemplars through its own fine-tune at ``lambda = 1`` (the paper's Algorithm 1 and the
  code agree); the statistics stage computes every statistic with the fine-tune (fusion_bench/stages/statistics.py).
* exemplars: 64 per task from the training split (Sec. 6.3: "we empirically recommend using 64 samples per task";
  16 is already close, Table 6).  ``method.statistics.num_samples``.
* scale: ``lambda = 1.2`` for ViT-B/32 and ``1.5`` for ViT-L/14 (Sec. 6.3; 1.0 "already yields competitive
  performance"); conf/method/lot_merging.yaml uses 1.2, the value of the paper's main table.
* pseudo-inverse tolerance (the default follows the code, ``official``; ``pinv_cutoff=data`` is the exact form):
  the paper writes the Moore-Penrose inverse; the code calls ``torch.linalg.pinv(sum_XTX)`` with its default
  tolerance on fp32 features, so eigenvalues of ``sum_t G_t`` below ``in * eps(float32) * lambda_max`` count as zero
  (``9.2e-5 lambda_max`` at 768 inputs, ``3.7e-4`` at 3072).  No ridge.  That cut-off is far above what fp32 rounding
  can blur and drops real, weakly excited input directions (DESIGN.md "Facts that bite": ill-conditioned is not
  null): measured on tiny_clip fine-tunes (64 exemplars per task, 2 tasks), the fp32 Grams differ from fp64 Grams
  of the same features by ``||E|| = 2e-8 lambda_max``, while ``in * eps(float32)`` (``6.1e-5`` at 512 inputs) dropped
  10 and 71 of the 512 directions of two ``c_proj`` maps (real eigenvalues ``2e-5 .. 6e-5 lambda_max``) and the
  LayerNorm direction of ``c_fc`` (``3e-7``).  ``pinv_cutoff`` (the eigenvalues of ``sum_t G_t`` taken as zero):

  - ``data``: ``|lambda| <= eps * trace(sum_t G_t)``, ``eps`` of the Grams' dtype (fp32 in the store): a
    bound on the spectral norm of their rounding (each entry rounded to ``eps sqrt(G_ii G_jj)``, whose Frobenius norm
    is at most ``eps trace``; 20x the measured error above).  Only what the Grams cannot determine is dropped: the
    exact null space of fewer exemplar rows than inputs (it sits at ``1e-10 .. 1e-8 lambda_max`` in fp32 Grams);
  - ``official`` (default): ``|lambda| <= in * eps * lambda_max`` (torch.linalg.pinv's default, as the official code
    calls it; the fp32 Grams of the store give the code's cut-off). It is the default because it is what produced
    the paper's tables, and because the exact form amplifies the weakly excited directions: on the tiny T5 (full
    fine-tunes, 2026-12-07) ``data`` scores 4.6 where ``official`` scores 36.9;
  - a number ``r`` in [0, 1): ``|lambda| <= r * lambda_max``.

  The solve runs in fp64 (the code: fp32 on the GPU): with ``official`` the two agree up to fp32 rounding.
* scales of the normalisation layers: the code recovers ``x_hat = (LN(x) - b) / (w + 1e-12)`` from the layer's output
  and sets a zero denominator to 1e-10; here ``x_hat`` is recomputed from the layer's input (exact) and a zero
  denominator gives ``T[d] = 0`` (what the code's ``0 / 1e-10`` gives).
* weighting of the tasks: the paper's objectives are sums over every sample (a task with more exemplar rows weighs
  more); the stored statistics are means over each map's positions (fusion_bench/statistics/grams.py), so every task
  weighs by the second moment of its inputs.  With the same number of exemplars per task and a fixed number of
  tokens per input (CLIP: 50 at ViT-B/32) the two differ by one factor common to all tasks and give the same ``T``;
  for T5, whose tasks have different sequence lengths, each task weighs by its per-token moments (as RegMean here).
* which linear maps: the paper treats every matrix product as a linear layer ("the computations of queries, keys,
  and values (QKV) are disentangled and analyzed as independent layers"); this merges every map with a Gram by
  Eq. 9.  Not verified: whether the official ViT code reaches open_clip's attention (``nn.MultiheadAttention``
  applies ``in_proj_weight`` and ``out_proj`` through their weights, so forward hooks on ``nn.Linear`` modules see
  neither: DESIGN.md "Facts that bite"); if it does not, its attention weights got the mean of the task vectors.
  The patch embedding ``conv1`` (a convolution is a matrix product, Sec. 4) has no Gram here: mean.
* what the merge needs: the statistics block ``{kind: gram, norm_scales: true}``; without ``norm_scales`` (e.g.
  RegMean's Grams) the normalisation scales take the mean of the task vectors.

Supported: every plain-weight merge space (finetune=standard, attention, linear_layers, lora as merged weights) of
CLIP (open_clip ViTs, tiny_clip) and T5 (tiny_t5, FLAN-T5; its ``T5LayerNorm`` is an RMS norm: Eq. 12 with its
``x_hat``).  Refused before any work by the statistics stage: linearized fine-tunes and LoRA adapter merge spaces
(finetune=linear, l_lora, lora with task_vector=adapters), for which there are no input Grams.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import ONE_COEF, any_of, choice, fraction

from .registry import merging_method
from .regmean import gram_system
from .task_vectors import StateDict, finish, is_number, prepare, scalar_coef, statistic_keys

log = logging.getLogger(__name__)

METHOD = "lot_merging"
CUTOFFS = ("data", "official")  # pinv_cutoff's named choices (besides a number in [0, 1))


@merging_method(kind="statistics", statistic="gram", affine=True)
def lot_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    grams: Sequence[Mapping[str, Tensor]],
    scaling_coef: float = 1.0,
    pinv_cutoff: str | float = "official",
) -> dict[str, Tensor]:
    """LOT Merging of ``finetuned`` (see the module doc): ``theta_0 + scaling_coef * T``.

    ``grams``: one mapping per task, keyed like the weights: an ``[in, in]`` input Gram for a linear map (``[rows,
    rows]`` for open_clip's ``x @ proj``), a ``[d]`` mean of ``x_hat^2`` for a normalisation scale (``input_grams(...,
    norm_scales=True)``); keys without one take the mean of the task vectors.  ``pinv_cutoff``: which eigenvalues
    of ``sum_t G_t`` the pseudo-inverse takes as zero: ``data`` (below ``eps trace``, what the Grams' precision cannot
    determine), ``official`` (below ``in eps lambda_max``, torch.linalg.pinv's default as the official code calls it)
    or a number ``r`` in [0, 1) (below ``r lambda_max``); ``eps`` of the Grams' dtype.

    Raises ``ValueError`` (naming the key and the task) for a statistic given for some tasks only, one of the wrong
    shape, one of a key that is neither a 2-D nor a 1-D float weight, a negative second moment, a non-finite summed
    Gram, and for a ``pinv_cutoff`` that is none of those.
    """
    inp = prepare(pretrained, finetuned, METHOD)
    lam = scalar_coef(scaling_coef, METHOD)
    if pinv_cutoff not in CUTOFFS and not (is_number(pinv_cutoff) and 0.0 <= float(pinv_cutoff) < 1.0):
        raise ValueError(f"{METHOD}: pinv_cutoff must be one of {CUTOFFS} or a number in [0, 1), got {pinv_cutoff!r}")
    for key in statistic_keys(inp, grams, METHOD, "Gram"):
        if len(inp.shapes[key]) not in (1, 2):
            raise ValueError(f"{METHOD}: a statistic was given for {key!r}, which is neither a linear map's 2-D "
                             f"weight nor a normalisation scale ({tuple(inp.shapes[key])})")
    out: dict[str, Tensor] = {}
    kept, closed_form, scales = [], 0, 0
    for key in inp.float_keys:
        pre = inp.pretrained[key]
        if key in grams[0] and len(inp.shapes[key]) == 2:
            delta, rank, d_in = _linear_task_vector(key, pre, [ft[key] for ft in inp.finetuned],
                                                    [g[key] for g in grams], inp.names, pinv_cutoff)
            out[key] = (pre.to(torch.float64) + lam * delta).to(inp.dtypes[key]).contiguous()
            closed_form += 1
            kept.append((key, rank, d_in))
        elif key in grams[0]:
            delta = _scale_task_vector(key, pre, [ft[key] for ft in inp.finetuned], [g[key] for g in grams],
                                       inp.names)
            out[key] = (pre.to(torch.float64) + lam * delta).to(inp.dtypes[key])
            scales += 1
        else:  # biases, shifts, embeddings, anything without a statistic: the mean of the task vectors
            pre32 = pre.float()
            acc = inp.finetuned[0][key].float() - pre32
            for ft in inp.finetuned[1:]:
                acc.add_(ft[key].float()).sub_(pre32)
            out[key] = pre32.add(acc, alpha=lam / inp.n).to(inp.dtypes[key])
    short = [(k, r, d) for k, r, d in kept if r < d]
    log.info("%s: %d linear maps by the pseudo-inverse (%d with a singular summed Gram%s), %d normalisation scales "
             "by Eq. 12, %d keys the mean of the task vectors; theta_0 + %g * T", METHOD, closed_form, len(short),
             f", e.g. {short[0][0]} rank {short[0][1]} of {short[0][2]}" if short else "", scales,
             len(inp.float_keys) - closed_form - scales, lam)
    return finish(inp, out)


def _linear_task_vector(key: str, pre: Tensor, weights: list[Tensor], grams: list[Tensor], names: list[str],
                        cutoff: str | float) -> tuple[Tensor, int, int]:
    """``(T, rank, in)``: Eq. 9's merged task vector of a linear map in fp64, shaped like the weight, the number of
    eigen-directions of ``sum_t G_t`` the pseudo-inverse keeps, and the map's input size."""
    lhs, rhs, right = gram_system(METHOD, key, pre, weights, grams, names, minus=pre)
    if not (torch.isfinite(lhs).all() and torch.isfinite(rhs).all()):
        raise ValueError(f"{METHOD}: the summed Gram of {key!r} (or its product with the task vectors) is not finite")
    eps = max(torch.finfo(g.dtype).eps if g.is_floating_point() else 0.0 for g in grams)  # the Grams' precision
    w, v = torch.linalg.eigh(lhs)  # lhs = V diag(w) V^T; the pseudo-inverse inverts the w above the cut-off
    if cutoff == "data":
        zero = eps * float(lhs.diagonal().sum())
    elif cutoff == "official":
        zero = lhs.shape[0] * eps * float(w.abs().max())
    else:
        zero = float(cutoff) * float(w.abs().max())
    keep = w.abs() > zero
    v = v[:, keep]
    t = v @ ((v.T @ rhs) / w[keep].unsqueeze(1))  # [in, out] = T^T (T of proj itself for x @ proj)
    return (t if right else t.T), int(keep.sum()), lhs.shape[0]


def _scale_task_vector(key: str, pre: Tensor, weights: list[Tensor], moments: list[Tensor],
                       names: list[str]) -> Tensor:
    """Eq. 12 for a normalisation scale: the mean of the task vectors weighted per dimension by E[x_hat^2]."""
    num = torch.zeros(pre.shape, dtype=torch.float64, device=moments[0].device)
    den = torch.zeros_like(num)
    base = pre.to(device=num.device, dtype=torch.float64)
    for w, m, name in zip(weights, moments, names):
        if m.shape != pre.shape:
            raise ValueError(f"{METHOD}: the statistic of {key!r} for {name} has shape {tuple(m.shape)} but the "
                             f"normalisation scale needs {tuple(pre.shape)} (the mean of x_hat^2 per dimension)")
        m = m.to(dtype=torch.float64)
        if not torch.isfinite(m).all() or (m < 0).any():
            raise ValueError(f"{METHOD}: the statistic of {key!r} for {name} has negative or non-finite entries; "
                             "it must be the mean of x_hat^2 (input_grams(..., norm_scales=True))")
        num += m * (w.to(device=num.device, dtype=torch.float64) - base)
        den += m
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0).to(pre.device)


# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
lot_merging.ranges = {
    "scaling_coef": ONE_COEF,
    "pinv_cutoff": any_of(choice(*CUTOFFS), fraction(high_open=True, note="the pseudo-inverse's cut-off relative to "
                                                                       "the largest eigenvalue of the summed Gram")),
}
