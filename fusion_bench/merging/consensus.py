r"""Consensus merging and TALL masks (Wang et al., ICML 2024, "Localizing Task Information for
Improved Model Merging and Compression").

Per entry of every float key, with ``tau_t = theta_t - theta_0``:

* multi-task vector ``tau_MTL``:

  - ``base="task_arithmetic"``: ``sum_t tau_t`` (Consensus-TA, TALL over TA);
  - ``base="ties"`` (Consensus-TIES, TALL over TIES), the official code's
    ``ties_merging(tv, reset_thresh=20, merge_func="dis-sum")``, unscaled:

    1. trim: per task keep ``tau_t`` where ``|tau_t| >= v_t``, ``v_t`` the ``(int(ties_k * N) + 1)``-th
       largest ``|tau_t|`` over the WHOLE flattened vector (all ``N`` float entries), the official
       ``topk_values_mask`` convention (``kthvalue(N - int(ties_k * N))``: one entry more than
       ``int(ties_k * N)``, and every entry tied with ``v_t``); ``ties_k = 1`` keeps everything;
    2. elect: ``gamma = sign(sum_t trimmed_t)``;
    3. disjoint aggregate over the trimmed entries whose sign agrees with ``gamma``:
       ``ties_agg="sum"`` (default, the official code's ``dis-sum``) adds them,
       ``ties_agg="mean"`` divides that sum by their number (TIES's own ``dis-mean``; the count is
       clamped to >= 1).  The TIES scaling is not applied to ``tau_MTL``.

* TALL mask of task ``t``: ``m_t = 1[|tau_t| >= lambda_t |tau_MTL - tau_t|]`` (the untrimmed
  ``tau_t``, also for TIES). It is ``|theta_0 - theta_t| >= lambda_t |theta_MTL - theta_t|``:
  the entries where the multi-task model is closer to task ``t``'s fine-tune than theta_0 is;
* consensus mask ``m = 1[sum_t m_t >= k]`` (``k = 2`` in the paper: drop entries that matter to
  at most one task, "selfish" weights, and to none, "catastrophic" weights).

:func:`consensus_merging`: ``theta = theta_0 + alpha * (m * tau_MTL)``, ``alpha`` (``scaling_coef``)
chosen on validation.  :func:`tall_masks`: task-specific, task ``t`` uses
``theta_0 + m_t * tau_MTL``; returned as a :class:`~fusion_bench.merging.task_specific.TaskSpecificMerge`.
``lambda_t`` is picked per task from :data:`tall_mask_lambda_grid` by that task's validation
accuracy of ``theta_0 + m_t * tau_MTL`` (the pipeline's job: call :func:`tall_masks` with each
grid value, then once with the chosen list).

The official code (nik-dim/tall_masks, ``src/eval/aggregation.py``) builds BOTH the TALL masks
and the Consensus-TIES vector with ``merge_func="dis-sum"`` (hard-coded; its configs'
``ties_agg: sum`` only names the saved mask file).  The mean (TIES's own aggregation) gives a
``tau_MTL`` of the size of one trimmed task vector instead of their sum, which changes the masks
(``|tau_MTL - tau_t|``) as well as the merged vector; it is kept as ``ties_agg="mean"``.

Where this differs from the official code, on purpose or by measure-zero ties:

* the masks compare with ``>=`` where the official code has ``>``: they differ only where
  ``|tau_t| = lambda_t |tau_MTL - tau_t|`` exactly, i.e. (for ``lambda_t > 0``) at
  ``tau_t = tau_MTL = 0``, where the mask value changes no weight, or at exact floating-point ties;
* a zero elected sum elects ``+``; the official code gives such entries the majority sign of the
  whole vector.  Both give 0 where every trimmed entry is 0; they differ only where non-zero
  trimmed entries cancel exactly.

One keys-outer pass over column chunks (plus, for TIES, the task-outer pass that finds the
exact global trim thresholds).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fusion_bench.errors import ConfigError
from fusion_bench.validation.ranges import ONE_COEF, Context, ListOf, Number, any_of, choice, non_negative

from .registry import merging_method
from .task_specific import TaskSpecificMerge
from .task_vectors import (
    MergeInputs,
    StateDict,
    Workspace,
    finish,
    is_number,
    prepare,
    scalar_coef,
    shrink_lambda,
    stream_blocks,
)
from .ties import KEPT_FRACTION, check_k, global_thresholds, ties_block

#: the paper's grid for each task's TALL-mask lambda (chosen per task on validation)
tall_mask_lambda_grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)

BASES = ("task_arithmetic", "ties")
#: disjoint aggregations of the TIES multi-task vector: the official code's ``dis-sum`` (default), TIES's ``dis-mean``
TIES_AGGS = ("sum", "mean")


def check_lambdas(lambdas: float | Sequence[float], n: int, method: str) -> list[float]:
    """TALL-mask lambdas: one float >= 0 for every task, or a list of ``n`` floats >= 0."""
    if isinstance(lambdas, str):
        raise TypeError(f"{method}: lambdas={lambdas!r} is a string; pass a number or a list of {n} numbers")
    if isinstance(lambdas, Tensor):
        lambdas = lambdas.tolist()
    if is_number(lambdas):
        vals = [float(lambdas)] * n
    else:
        try:
            vals = [float(x) for x in lambdas]
        except TypeError as e:
            raise TypeError(f"{method}: lambdas={lambdas!r} must be a float or a list of {n} floats") from e
        if len(vals) != n:
            raise ValueError(
                f"{method}: lambdas has {len(vals)} values but {n} task vectors were given; "
                f"expected one float or a list of {n} floats"
            )
    for v in vals:
        if not math.isfinite(v) or v < 0:
            raise ValueError(
                f"{method}: lambdas must be finite and >= 0 (the paper's grid is 0.2..0.6), got {v}"
            )
    return vals


def _check_base(base: str, method: str) -> str:
    if base == "ta":
        base = "task_arithmetic"
    if base not in BASES:
        raise ValueError(f"{method}: base={base!r} must be 'task_arithmetic' or 'ties'")
    return base


def _check_agg(ties_agg: str, method: str) -> str:
    if ties_agg not in TIES_AGGS:
        raise ValueError(
            f"{method}: ties_agg={ties_agg!r} must be 'sum' (the official code's dis-sum) or 'mean' (dis-mean)"
        )
    return ties_agg


def _tall_pass(
    inp: MergeInputs,
    lambdas: Sequence[float],
    base: str,
    ties_k: float,
    ties_agg: str,
    visit: Callable[[str, int, int, Tensor, Tensor, Tensor], None],
) -> None:
    """Keys-outer pass: ``visit(key, start, end, mtl, masks, pre32)`` with ``mtl`` the fp32 ``tau_MTL``
    chunk, ``masks`` the ``(n, end - start)`` bool block of TALL masks and ``pre32`` the fp32
    pretrained chunk (workspace views, valid during the call)."""
    n = inp.n
    ws, ws_ties = Workspace(), Workspace()
    if base == "ties":
        shrinks = (
            [0.0] * n if ties_k >= 1.0 else [shrink_lambda(v) for v in global_thresholds(inp, ties_k, extra=1)]
        )

    def block(X: Tensor, key: str, s: int, e: int, p32: Tensor) -> None:
        c = e - s
        if base == "ties":
            Y = ws_ties.block("Y", n, c).copy_(X)
            mtl = ties_block(Y, shrinks, 1.0, ws_ties, ties_agg)  # a ws_ties view
        else:
            mtl = torch.sum(X, 0, out=ws.get("mtl", c))
        M = ws.block("M", n, c, torch.bool)
        a, d = ws.get("a", c), ws.get("d", c)
        for t in range(n):
            torch.abs(X[t], out=a)
            torch.sub(mtl, X[t], out=d).abs_().mul_(lambdas[t])
            torch.ge(a, d, out=M[t])
        visit(key, s, e, mtl, M, p32)

    stream_blocks(inp, block)


@merging_method("consensus_ta", "consensus_ties", kind="data-free", affine=True)  # base=task_arithmetic | ties
def consensus_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    k: int = 2,
    lambdas: float | Sequence[float] = 0.4,
    base: str = "task_arithmetic",
    scaling_coef: float = 0.3,
    ties_k: float = 0.2,
    ties_agg: str = "sum",
) -> dict[str, Tensor]:
    """Consensus merging: ``theta_0 + scaling_coef * (1[sum_t m_t >= k] * tau_MTL)`` (see module doc).

    Args:
        k: minimum number of tasks whose TALL mask must select an entry (paper: 2), in ``[1, n_tasks]``.
        lambdas: TALL-mask lambda, one float for all tasks or one per task (paper: per task from
            0.2..0.6 on validation; 0.4 is the grid's middle).
        base: ``"task_arithmetic"`` (``tau_MTL = sum_t tau_t``) or ``"ties"`` (the TIES merged vector).
        scaling_coef: ``alpha``, one float (chosen on validation).
        ties_k: TIES's kept fraction of each task vector (paper's TIES: 0.2); only for ``base="ties"``.
        ties_agg: ``"sum"`` (the official code's disjoint sum) or ``"mean"`` (TIES's disjoint mean) of the
            agreeing trimmed entries; only for ``base="ties"``.
    """
    method = "consensus_merging"
    inp = prepare(pretrained, finetuned, method)
    base = _check_base(base, method)
    kk = check_count(k, inp.n, method)
    lams = check_lambdas(lambdas, inp.n, method)
    alpha = scalar_coef(scaling_coef, method)
    if base == "ties":
        check_k(ties_k, f"{method}(base='ties'): ties_k")
        _check_agg(ties_agg, method)
    out: dict[str, Tensor] = {}
    outs_flat: dict[str, Tensor] = {}
    for key in inp.float_keys:
        out[key] = torch.empty(inp.shapes[key], dtype=inp.dtypes[key])
        outs_flat[key] = out[key].view(-1)
    ws = Workspace()

    def visit(key: str, s: int, e: int, mtl: Tensor, M: Tensor, p32: Tensor) -> None:
        c = e - s
        cnt = torch.sum(M, 0, dtype=torch.int32, out=ws.get("cnt", c, torch.int32))
        keep = torch.ge(cnt, kk, out=ws.get("keep", c, torch.bool))
        upd = torch.mul(mtl, keep, out=ws.get("upd", c)).mul_(alpha)
        o = outs_flat[key][s:e]
        if o.dtype == torch.float32:
            torch.add(p32, upd, out=o)
        else:
            o.copy_(upd.add_(p32))

    _tall_pass(inp, lams, base, float(ties_k), ties_agg, visit)
    return finish(inp, out)


@merging_method(kind="task-specific")
def tall_masks(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    lambdas: float | Sequence[float] = 0.4,
    base: str = "task_arithmetic",
    ties_k: float = 0.2,
    ties_agg: str = "sum",
) -> TaskSpecificMerge:
    """TALL masks: a :class:`TaskSpecificMerge` with shared ``tau_MTL`` and masks ``m_t`` (rescalers 1).

    Task ``t`` uses ``theta_0 + m_t * tau_MTL`` (:meth:`TaskSpecificMerge.task_weights`).  ``lambdas``:
    one float or one per task (choose each from :data:`tall_mask_lambda_grid` on that task's
    validation split).  ``base`` / ``ties_k`` / ``ties_agg`` as in :func:`consensus_merging`.  Memory: the shared
    vector in fp32 (4 bytes/parameter) and one bool per parameter and task.
    """
    method = "tall_masks"
    inp = prepare(pretrained, finetuned, method)
    base = _check_base(base, method)
    lams = check_lambdas(lambdas, inp.n, method)
    if base == "ties":
        check_k(ties_k, f"{method}(base='ties'): ties_k")
        _check_agg(ties_agg, method)
    shared = {key: torch.empty(inp.shapes[key], dtype=torch.float32) for key in inp.float_keys}
    masks = {key: torch.empty((inp.n, *inp.shapes[key]), dtype=torch.bool) for key in inp.float_keys}

    def visit(key: str, s: int, e: int, mtl: Tensor, M: Tensor, p32: Tensor) -> None:
        shared[key].view(-1)[s:e].copy_(mtl)
        masks[key].view(inp.n, -1)[:, s:e].copy_(M)

    _tall_pass(inp, lams, base, float(ties_k), ties_agg, visit)
    return TaskSpecificMerge(
        pretrained=inp.pretrained,
        shared=shared,
        masks=masks,
        rescalers=[1.0] * inp.n,
        method=f"tall_masks({base})" if base != "ties" else f"tall_masks(ties, dis-{ties_agg})",
        rescaler_bits=0,
        keys=list(inp.keys),
    )


def check_count(k: object, n: int, method: str) -> int:
    """Consensus threshold: an integer in ``[1, n_tasks]``."""
    ok = not isinstance(k, bool) and isinstance(k, numbers.Real) and float(k).is_integer()
    if not ok:
        raise ValueError(f"{method}: k={k!r} must be an integer number of tasks (the paper uses 2)")
    kk = int(k)
    if kk < 1 or kk > n:
        raise ValueError(
            f"{method}: k={kk} must be in [1, {n}] (the number of tasks): an entry is kept when at "
            f"least k of the {n} TALL masks select it"
        )
    return kk

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
LAMBDAS = any_of(choice("search"), non_negative("a TALL mask's lambda"), ListOf(non_negative(), per_task=True))
TALL_RANGES = {
    "lambdas": LAMBDAS,
    "base": choice("task_arithmetic", "ta", "ties"),
    "ties_k": KEPT_FRACTION,
    "ties_agg": choice(*TIES_AGGS),
}


def _check_consensus_settings(settings: dict, ctx: Context) -> None:
    k = settings.get("k", 2)
    if not float(k).is_integer():
        raise ConfigError(f"method.k={k}: must be a whole number of tasks (masks that must agree; the paper: 2)")
    if k > len(ctx.tasks):
        raise ConfigError(f"method.k={k}: must be at most the number of tasks ({len(ctx.tasks)}): an entry is kept "
                          f"when at least k of the TALL masks select it")


consensus_merging.ranges = {**TALL_RANGES, "k": Number(low=1, note="a whole number of masks that must agree"),
                            "scaling_coef": ONE_COEF}
consensus_merging.check_settings = _check_consensus_settings
tall_masks.ranges = TALL_RANGES
