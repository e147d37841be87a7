r"""PCB-merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024, arXiv 2410.02396).

Definition implemented (the official code's; ``N`` tasks, every float key of every task vector flattened into one
vector of ``d`` entries per task, ``tau_i = theta_i - theta_0``):

1. Outlier clamp: ``a_i = clamp(|tau_i|, lo_i, hi_i)`` with ``lo_i = sort(|tau_i|)[int(d c)]`` and
   ``hi_i = sort(|tau_i|)[int(d (1 - c) - 1)]`` (ascending, 0-based; ``c = clamp_ratio``); the clamped task
   vector is ``sign(tau_i) a_i``.
2. ``u_i = Norm(a_i)``, ``Norm`` the min-max normalisation over the ``d`` entries (``(x - min) / (max - min)``).
3. Intra-balancing: ``exp(N u_i^2)`` (computed as the stable softmax numerator ``exp(N (u_i^2 - 1))``: a positive
   factor per task, which step 6 cancels exactly).
4. Inter-balancing (``inter``), with ``s_j = sign(tau_j) u_j``:

   * ``"sum"`` (default): ``tanh(tau_i * sum_j tau_j)`` (raw task vectors);
   * ``"normalized_sum"``: ``tanh(tau_i * sum_j s_j)``;
   * ``"pairwise"``: ``sum_j tanh(s_i * s_j)`` (``j = i`` included).

5. ``beta_i = intra_i * inter_i``.
6. Drop and rescale: ``q_i = sort(beta_i)[int(d (1 - r))]`` (``r = pcb_ratio``, the share KEPT),
   ``w_i = Norm(max(beta_i, q_i)) = (max(beta_i, q_i) - q_i) / (max(beta_i) - q_i)``: entries at or below
   ``q_i`` get weight 0, the others ``(beta_i - q_i) / (max beta_i - q_i)``.
7. ``tau_m = sum_i lambda_i w_i sign(tau_i) a_i / max(sum_i w_i, 1e-12)``; ``theta = theta_0 + tau_m``.
   With one ``lambda = scaling_coef`` this is ``theta_0 + lambda * tau_m(1)`` (affine); a list gives one
   ``lambda_i`` per task (the official evolutionary search tunes those).

Conventions where the code would divide 0 by 0 (NaN): a min-max normalisation of a constant (``max = min``: all
``|tau_i|`` equal, or ``max beta_i = q_i``) gives 0.  Non-float keys are copied from ``theta_0``; fp32 arithmetic,
outputs in the pretrained dtype.

Official code and defaults (github.com/duguodong7/pcb-merging)
--------------------------------------------------------------
The repository holds three variants of step 4:

* ``pcb-merging.py`` (the README: "the details of our method", the key steps), ``PCB_merge``: ``"sum"``,
  ``c = 0.0001``, ``pcb_ratio`` 0.1 (its default; 0.05 in the script below it, which then tunes per-task ``lambda``
  by an evolutionary search as ``pcb_ES.py`` does);
* ``nlp_source_code/utils/merge_utils.py`` (``task_para_att_merge``, run by ``nlp_source_code/merging.py`` as
  ``TPA_<ratio>_<lambdas>`` from ``run_merging.sh``, which produced the T5 tables): ``"sum"``, ``c = 0.01``,
  ``att_ratio`` 0.05 / 0.1 / 0.2, ``lambda`` searched over 0.8 .. 2.2 (T5; (IA)^3: 1.0);
* ``vision_source_code/pcb.py``: ``"normalized_sum"``, ``c = 0.01``, ``att_ratio`` 0.05, ``lambda`` 1.2 for every
  task; ``vision_source_code/pcb_ES.py``: ``"pairwise"``, ``c = 0.01``, ``pcb_ratio`` 0.05, per-task ``lambda``
  by an evolutionary search (nevergrad NGOpt, 100 evaluations on val, start 1.0, bounds [0.8, 1.3]; not here).

Defaults here: ``inter="sum"`` (the form of the file the README names as the method and of the code behind the
T5 tables), ``clamp_ratio=0.01`` (every experiment script), ``pcb_ratio=0.1`` (``PCB_merge``'s default, ``TPA_10``),
``scaling_coef=1.2`` (the one fixed ``lambda`` in the repository, ``vision_source_code/pcb.py``'s; the others are
searched on validation, mostly above 1, so the pipeline's grid 0 .. 1 (``scaling_coef: search``) covers only part
of their range).  For the ViT scripts' settings use ``inter=normalized_sum`` (or ``pairwise``) and
``pcb_ratio=0.05``.  Which variant produced the published ViT table cannot be told from the repository.  The
reference framework (FusionBench) has no PCB.

Where the paper and the code disagree (the code is followed)
------------------------------------------------------------
The paper (Sec. 3, as read for this module; its PDF could not be re-checked here) writes
``beta_intra,i = Softmax(N * Norm(tau_i * tau_i))``, ``beta_inter,i = sum_j Softmax(Norm(tau_i * tau_j))``,
``beta_i = beta_intra,i * beta_inter,i``, keeps ``beta_i >= sort(beta_i)[(1 - r) d]`` with weight ``beta_i``
itself and rescales ``tau_m = sum_i beta_i tau_i / sum_i beta_i``, ``theta = theta_0 + lambda tau_m``.

* Intra: the code's ``exp`` is the softmax without its per-task denominator, which step 6 cancels: the same merge.
  But the code squares the normalised magnitude, ``Norm(|tau|)^2``, where the paper normalises the square,
  ``Norm(tau^2)`` (equal only when ``min |tau_i| = 0``), and it normalises the CLAMPED magnitudes.
* Inter: no variant of the code uses a softmax; all use ``tanh``, and ``"sum"`` applies it once to the raw
  ``tau_i * sum_j tau_j`` (no normalisation) instead of summing per-pair activations.
* The outlier clamp (step 1) is not in the paper; the code merges the clamped task vectors.
* Drop and rescale: the paper weights kept entries by ``beta``; the code by ``(beta - q) / (max beta - q)``, so the
  entry AT the threshold and below gets 0, and the weights rise from 0 at ``q`` to 1 at the maximum.
* The code clamps the rescaling denominator at ``1e-12``.

Streaming (exact, no copy of any model)
---------------------------------------
Steps 1-7 use only per-entry arithmetic and, per task, four global numbers: ``lo_i``, ``hi_i`` (order statistics
of ``|tau_i|``), ``q_i`` (an order statistic of ``beta_i``) and ``max beta_i``.  Each order statistic is found
exactly by a two-pass radix select over streamed chunks (:class:`RankSelect`: a histogram of the top 16 bits of
an order-preserving 32-bit key of every value, then of the low 16 bits inside the one bucket that holds the
answer), all tasks at once, holding ``N`` histograms of ``2^16`` counts and never a flat vector.  Keys-outer passes
over the checkpoints (each loads one key of every model at a time): two for ``lo, hi`` (one when
``clamp_ratio = 0``: min and max), two for ``q, max beta`` (``beta`` recomputed), one to merge.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import PER_TASK_COEF, Number, choice, fraction

from .registry import merging_method
from .task_vectors import (
    MergeInputs,
    StateDict,
    Workspace,
    _select_bucket,
    is_number,
    prepare,
    scaling_coefs,
    stream_blocks,
    stream_merge,
)

log = logging.getLogger(__name__)

#: what ``inter`` may be (module doc, step 4)
INTERS = ("sum", "normalized_sum", "pairwise")
#: the official code's floor of the rescaling denominator
DENOMINATOR_FLOOR = 1e-12

_BINS = 1 << 16
_INT32_MIN = -(1 << 31)


# --------------------------------------------------------------------------------------------
# exact order statistics of streamed fp32 values
# --------------------------------------------------------------------------------------------
def order_keys(x: Tensor) -> Tensor:
    """int32 tensors holding the bit patterns of uint32 keys that order like the fp32 values ``x`` (any sign;
    ``-0.0`` just below ``+0.0``): the float's bits with the sign bit flipped when non-negative, all bits flipped
    when negative."""
    bits = x.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) | _INT32_MIN)


def key_value(key: int) -> float:
    """The fp32 value of an :func:`order_keys` key given as an unsigned integer in ``[0, 2^32)``."""
    bits = key - (1 << 31) if key >= 1 << 31 else -1 - key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


class RankSelect:
    """Exact ``m``-th largest values (``1 <= m <= count``) of ``n`` streams of fp32 values, fed chunk by chunk as
    ``(n, c)`` blocks in two passes: :meth:`add_high` over every chunk, :meth:`split`, :meth:`add_low` over the
    same chunks again, :meth:`values`.  Radix select on :func:`order_keys` (16 high bits, then the 16 low bits of
    the bucket holding each answer); ``ranks[i]`` lists the ranks wanted of stream ``i`` (as many for every
    stream); memory: ``n`` histograms of ``2^16`` counts, plus one per answer."""

    def __init__(self, ranks: Sequence[Sequence[int]]):
        self.ranks = [list(r) for r in ranks]
        self.n, self.r = len(self.ranks), len(self.ranks[0])
        if any(len(r) != self.r for r in self.ranks):
            raise ValueError("RankSelect: as many ranks for every stream")
        self.high = torch.zeros(self.n, _BINS, dtype=torch.int64)
        self.buckets = self.rest = None  # after split: (n, r) bucket of each answer, its rank inside the bucket
        self.low = torch.zeros(self.n * self.r * _BINS, dtype=torch.int64)  # one low histogram per answer
        self.slots = (torch.arange(self.n * self.r, dtype=torch.int32) * _BINS).view(self.n, self.r)

    def add_high(self, X: Tensor) -> None:
        high = (order_keys(X) >> 16).bitwise_and_(_BINS - 1)
        for i in range(self.n):
            self.high[i] += torch.bincount(high[i], minlength=_BINS)

    def split(self) -> None:
        buckets, rest = [], []
        for i, ranks in enumerate(self.ranks):
            count = int(self.high[i].sum())
            for m in ranks:
                if not 1 <= m <= count:
                    raise ValueError(f"RankSelect: rank {m} of {count} values")
                b, r = _select_bucket(self.high[i], m)
                buckets.append(b)
                rest.append(r)
        self.buckets = torch.tensor(buckets, dtype=torch.int32).view(self.n, self.r)
        self.rest = rest

    def add_low(self, X: Tensor) -> None:
        keys = order_keys(X)
        high = (keys >> 16).bitwise_and_(_BINS - 1)
        low = keys.bitwise_and_(_BINS - 1)
        for j in range(self.r):
            slot = torch.masked_select(low + self.slots[:, j : j + 1], high == self.buckets[:, j : j + 1])
            if slot.numel():
                self.low.index_put_((slot.long(),), torch.ones(slot.numel(), dtype=torch.int64), accumulate=True)

    def values(self) -> list[list[float]]:
        low = self.low.view(self.n, self.r, _BINS)
        out: list[list[float]] = [[] for _ in range(self.n)]
        for i in range(self.n):
            for j in range(self.r):
                lo, _ = _select_bucket(low[i, j], self.rest[i * self.r + j])
                out[i].append(key_value((int(self.buckets[i, j]) << 16) | lo))
        return out


# --------------------------------------------------------------------------------------------
# per-entry arithmetic (module doc, steps 1-7)
# --------------------------------------------------------------------------------------------
class PCBState:
    """The per-task constants of a PCB merge: clamp bounds (step 1) and their min-max normalisation (step 2), and
    after the score pass the drop threshold and maximum of ``beta`` (step 6); ``(n, 1)`` fp32 columns."""

    def __init__(self, lo: Sequence[float], hi: Sequence[float], inter: str):
        col = lambda v: torch.tensor(list(v), dtype=torch.float32).unsqueeze(1)
        self.n = len(lo)
        self.inter = inter
        self.lo, self.hi = col(lo), col(hi)
        self.base = torch.minimum(self.lo, self.hi)  # min of clamp(|tau|, lo, hi) over the task vector
        span = self.hi - self.base  # its max - min
        self.span_ok = span > 0
        self.span = torch.where(self.span_ok, span, 1.0)
        self.q = self.top = self.drop_span = self.drop_ok = None

    def set_drop(self, q: Sequence[float], top: Sequence[float]) -> None:
        self.q = torch.tensor(list(q), dtype=torch.float32).unsqueeze(1)
        self.top = torch.tensor(list(top), dtype=torch.float32).unsqueeze(1)
        span = self.top - self.q
        self.drop_ok = span > 0
        self.drop_span = torch.where(self.drop_ok, span, 1.0)

    def clamped(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, u)``: the clamped magnitudes (step 1) and their normalisation (step 2)."""
        a = torch.clamp(X.abs(), min=self.lo, max=self.hi)
        u = (a - self.base).div_(self.span).mul_(self.span_ok)
        return a, u

    def scores(self, X: Tensor, u: Tensor) -> Tensor:
        """``beta`` (steps 3-5) of an ``(n, c)`` block of task vectors."""
        intra = torch.exp(u.square().sub_(1.0).mul_(float(self.n)))
        if self.inter == "sum":
            inter = torch.tanh(X * X.sum(0))
        elif self.inter == "normalized_sum":
            inter = torch.tanh(X * (torch.sign(X) * u).sum(0))
        else:  # pairwise: sum_j tanh(s_i s_j), each pair once
            s = torch.sign(X) * u
            inter = torch.zeros_like(s)
            for i in range(self.n):
                inter[i] += torch.tanh(s[i] * s[i])
                for j in range(i + 1, self.n):
                    t = torch.tanh(s[i] * s[j])
                    inter[i] += t
                    inter[j] += t
        return intra.mul_(inter)

    def weights(self, beta: Tensor) -> Tensor:
        """``w`` (step 6)."""
        return torch.maximum(beta, self.q).sub_(self.q).div_(self.drop_span).mul_(self.drop_ok)


def clamp_bounds(inp: MergeInputs, clamp_ratio: float) -> tuple[list[float], list[float]]:
    """``(lo_i, hi_i)`` per task: ``sort(|tau_i|)[int(d c)]`` and ``sort(|tau_i|)[int(d (1 - c) - 1)]`` over
    all float keys (step 1), exact."""
    d, n = inp.n_float, inp.n
    if clamp_ratio == 0.0:  # the minimum and maximum: one pass
        lo = torch.full((n,), math.inf)
        hi = torch.zeros(n)

        def extremes(X: Tensor, key: str, s: int, e: int, p32: Tensor) -> None:
            A = X.abs()
            torch.minimum(lo, A.amin(1), out=lo)
            torch.maximum(hi, A.amax(1), out=hi)

        stream_blocks(inp, extremes)
        return lo.tolist(), hi.tolist()
    a = int(d * clamp_ratio)
    b = int(d * (1 - clamp_ratio) - 1)
    sel = RankSelect([[d - a, d - b]] * n)  # the (a+1)-th and (b+1)-th smallest: (d-a)-th, (d-b)-th largest
    stream_blocks(inp, lambda X, key, s, e, p32: sel.add_high(X.abs()))
    sel.split()
    stream_blocks(inp, lambda X, key, s, e, p32: sel.add_low(X.abs()))
    values = sel.values()
    return [v[0] for v in values], [v[1] for v in values]


def drop_thresholds(inp: MergeInputs, state: PCBState, pcb_ratio: float) -> tuple[list[float], list[float]]:
    """``(q_i, max beta_i)`` per task over all float keys (step 6), exact; ``beta`` computed twice."""
    d, n = inp.n_float, inp.n
    m = d - int(d * (1 - pcb_ratio))  # sort(beta)[int(d (1 - r))] ascending = the m-th largest
    sel = RankSelect([[m]] * n)
    top = torch.full((n,), -math.inf)

    def first(X: Tensor, key: str, s: int, e: int, p32: Tensor) -> None:
        beta = state.scores(X, state.clamped(X)[1])
        sel.add_high(beta)
        torch.maximum(top, beta.amax(1), out=top)

    stream_blocks(inp, first)
    sel.split()
    stream_blocks(inp, lambda X, key, s, e, p32: sel.add_low(state.scores(X, state.clamped(X)[1])))
    return [v[0] for v in sel.values()], top.tolist()


@merging_method(kind="data-free", affine=True)
def pcb_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float | Sequence[float] = 1.2,
    pcb_ratio: float = 0.1,
    clamp_ratio: float = 0.01,
    inter: str = "sum",
) -> dict[str, Tensor]:
    """PCB-merging as the official code computes it (module doc).

    Args:
        scaling_coef: lambda (one float, or one per task); the official fixed value 1.2.
        pcb_ratio: the share of each task vector's entries KEPT by the drop, in (0, 1] (the code's ``pcb_ratio``
            / ``att_ratio``; 0.1 here, 0.05 in the ViT scripts).
        clamp_ratio: the share of the smallest and of the largest ``|tau|`` clamped, in [0, 0.5) (0.01).
        inter: inter-balancing form: ``"sum"``, ``"normalized_sum"`` or ``"pairwise"`` (module doc, step 4).
    """
    method = "pcb_merging"
    inp = prepare(pretrained, finetuned, method)
    if not is_number(pcb_ratio) or not (0.0 < float(pcb_ratio) <= 1.0):
        raise ValueError(
            f"{method}: pcb_ratio={pcb_ratio!r} must be a fraction in (0, 1] (the share of each task vector's "
            f"entries kept by the drop; the official code: 0.05 to 0.2)"
        )
    if not is_number(clamp_ratio) or not (0.0 <= float(clamp_ratio) < 0.5):
        raise ValueError(
            f"{method}: clamp_ratio={clamp_ratio!r} must be in [0, 0.5) (the share of the smallest and of the "
            f"largest |tau| clamped; the official code: 0.01)"
        )
    if inter not in INTERS:
        raise ValueError(f"{method}: inter={inter!r} must be one of {INTERS} (the inter-balancing form)")
    pcb_ratio, clamp_ratio = float(pcb_ratio), float(clamp_ratio)
    lam = torch.tensor(scaling_coefs(scaling_coef, inp.n, method), dtype=torch.float32).unsqueeze(1)
    if inp.n_float == 0:  # no float entries: nothing to merge
        return stream_merge(inp, lambda X, key, s, e, ws: X[0])
    if int(inp.n_float * (1 - pcb_ratio)) >= inp.n_float:  # the code would index past the end
        raise ValueError(
            f"{method}: pcb_ratio={pcb_ratio!r} keeps none of the {inp.n_float} entries of each task vector "
            f"(int(d * (1 - pcb_ratio)) = d); raise it (the official code: 0.05 to 0.2)"
        )
    lo, hi = clamp_bounds(inp, clamp_ratio)
    state = PCBState(lo, hi, inter)
    q, top = drop_thresholds(inp, state, pcb_ratio)
    state.set_drop(q, top)
    kept = [0] * inp.n

    def combine(X: Tensor, key: str, s: int, e: int, ws: Workspace) -> Tensor:
        a, u = state.clamped(X)
        w = state.weights(state.scores(X, u))
        for i, c in enumerate((w > 0).sum(1).tolist()):
            kept[i] += c
        num = (torch.sign(X).mul_(a).mul_(lam)).mul_(w).sum(0)
        return num.div_(w.sum(0).clamp_(min=DENOMINATOR_FLOOR))

    out = stream_merge(inp, combine)
    log.info(
        "pcb_merging: inter=%s, pcb_ratio=%g, clamp_ratio=%g over %d entries per task; kept (weight > 0) %s",
        inter,
        pcb_ratio,
        clamp_ratio,
        inp.n_float,
        ", ".join(f"{k / inp.n_float:.2%}" for k in kept),
    )
    return out


# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
pcb_merging.ranges = {
    "scaling_coef": PER_TASK_COEF,
    "pcb_ratio": fraction(low_open=True, note="the share of each task vector's entries kept by the drop"),
    "clamp_ratio": Number(
        low=0, high=0.5, high_open=True, note="the share of the smallest and largest |tau| clamped"
    ),
    "inter": choice(*INTERS),
}
