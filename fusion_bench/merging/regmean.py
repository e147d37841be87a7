"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

For a linear map ``y = W x`` (``W``: ``[out, in]``) with per-task input Grams ``G_t`` (``[in, in]``, from
:func:`fusion_bench.statistics.input_grams`) RegMean solves
``min_W sum_t ||X_t W^T - X_t W_t^T||^2``, whose solution is

    G~_t = a G_t + (1 - a) diag(G_t)                  (a = reduce_non_diagonal_ratio)
    W    = (sum_t W_t G~_t) (sum_t G~_t)^-1

computed as ``W^T = solve(sum_t G~_t, sum_t G~_t W_t^T)`` in fp64 (no explicit inverse).  open_clip's bare
``proj`` (key ``proj`` or ``*.proj``) is applied as ``x @ proj``: its ``W`` is ``proj^T``, so
``proj = solve(sum_t G~_t, sum_t G~_t proj_t)`` with ``G`` of size ``proj.shape[0]``.
Every other floating key takes the mean of the fine-tuned weights; integer / bool buffers are copied from
``pretrained``; the result has the pretrained dtypes.

Choices of the reference code (bloomberg/dataless-model-merging, and FusionBench's port): ``a`` multiplies
the off-diagonal entries only (diagonal kept); heads and other excluded keys take the plain mean.  The scale
of each ``G_t`` is how much task ``t`` weighs, so the Grams must be normalised alike for every task: they are
means of ``x x^T`` over the positions (tokens) each map reads, as in the references, padding excluded (see
fusion_bench/statistics/grams.py); a mean over samples would weigh each task by its sequence length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import fraction

from .registry import merging_method
from .task_vectors import StateDict, finish, prepare, statistic_keys


def is_right_multiplied(key: str) -> bool:
    """open_clip's ``proj`` is used as ``x @ proj`` (``W = proj^T``); every other weight as ``W x``."""
    return key == "proj" or key.endswith(".proj")


@merging_method(kind="statistics", statistic="gram")
def regmean(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    grams: Sequence[Mapping[str, Tensor]],
    reduce_non_diagonal_ratio: float = 0.9,
) -> dict[str, Tensor]:
    """RegMean merge of ``finetuned`` (one Gram dict per task, keyed like the weights): see the module doc.

    Raises ``ValueError`` naming the key (and the task) for a Gram given for some tasks only, a Gram of a
    key that is not a 2-D floating weight, a Gram whose size differs from the weight's input dimension, and
    a singular ``sum_t G~_t``.
    """
    inp = prepare(pretrained, finetuned, "regmean")
    a = float(reduce_non_diagonal_ratio)
    if not 0.0 <= a <= 1.0:
        raise ValueError(
            f"regmean: reduce_non_diagonal_ratio must lie in [0, 1], got {reduce_non_diagonal_ratio}"
        )
    for key in statistic_keys(inp, grams, "regmean", "Gram"):
        if len(inp.shapes[key]) != 2:
            raise ValueError(f"regmean: a Gram was given for {key!r}, which is not a 2-D float weight "
                             f"({tuple(inp.shapes[key])})")
    out: dict[str, Tensor] = {}
    for key in inp.float_keys:
        if key in grams[0]:
            out[key] = _merge_key(key, inp.pretrained[key], [ft[key] for ft in inp.finetuned],
                                  [g[key] for g in grams], a, inp.names)  # fmt: skip
        else:
            acc = inp.finetuned[0][key].to(torch.float32, copy=True)
            for ft in inp.finetuned[1:]:
                acc.add_(ft[key])
            out[key] = acc.div_(inp.n).to(inp.dtypes[key])
    return finish(inp, out)


def gram_system(
    method: str, key: str, pre: Tensor, weights: list[Tensor], grams: list[Tensor], names: list[str],
    a: float = 1.0, minus: Tensor | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """The normal equations of ``min_M sum_t ||X_t M - X_t M_t||^2`` for the linear map ``key`` (shared by RegMean
    and LOT Merging): ``(lhs, rhs, right)`` with ``lhs = sum_t G~_t`` ([in, in]) and ``rhs = sum_t G~_t M_t``
    ([in, out]) in fp64 on the Grams' device, ``M_t = W_t^T`` (``proj_t`` itself when ``right``: ``x @ proj``),
    ``W_t`` minus ``minus`` when given (LOT: the task vectors), ``G~_t`` as in the module doc.  Raises ValueError
    naming the key and the task for a Gram of the wrong size."""
    right = is_right_multiplied(key)
    d_in = pre.shape[0] if right else pre.shape[1]
    device = grams[0].device
    lhs = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    rhs = torch.zeros(d_in, pre.shape[1] if right else pre.shape[0], dtype=torch.float64, device=device)
    base = None if minus is None else minus.to(device=device, dtype=torch.float64)
    for w, g, name in zip(weights, grams, names):
        if g.shape != (d_in, d_in):
            what = "proj.shape[0] (x @ proj)" if right else "the input dimension shape[1]"
            raise ValueError(
                f"{method}: the Gram of {key!r} for {name} has shape {tuple(g.shape)} but the weight "
                f"{tuple(pre.shape)} needs [{d_in}, {d_in}] ({what})"
            )
        g = g.to(device=device, dtype=torch.float64)
        if a != 1.0:
            g = g * a + torch.diag(g.diagonal() * (1.0 - a))
        w = w.to(device=device, dtype=torch.float64)
        if base is not None:
            w = w - base
        lhs += g
        rhs += g @ (w if right else w.T)
    return lhs, rhs, right


def _merge_key(
    key: str, pre: Tensor, weights: list[Tensor], grams: list[Tensor], a: float, names: list[str]
) -> Tensor:
    lhs, rhs, right = gram_system("regmean", key, pre, weights, grams, names, a)
    try:
        merged = torch.linalg.solve(lhs, rhs)  # [in, out] = W^T (= proj for x @ proj)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"regmean: the summed Gram of {key!r} is singular (an input dimension never seen?); use "
            "reduce_non_diagonal_ratio < 1 or more samples, or leave this key out of the Grams"
        ) from err
    return (merged if right else merged.T).to(device=pre.device, dtype=pre.dtype).contiguous()

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
regmean.ranges = {"reduce_non_diagonal_ratio": fraction(note="the weight of the off-diagonal Gram entries")}
