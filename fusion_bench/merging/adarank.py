r"""AdaRank (Lee, Choi, Lee, Kim and Hong, "AdaRank: Adaptive Rank Pruning for Enhanced Model Merging",
arXiv 2503.22178, ICLR 2026): which singular components of each task vector enter the merge, learnt at test time
by minimising the entropy of the merged model's predictions on unlabelled inputs (as AdaMerging).

Definition
----------
``T`` tasks. The base gives a centre ``theta_c`` and the task vectors ``tau_t`` of every float key:

* ``method=adarank`` (base task arithmetic; the official ``merge_method: TA``): ``theta_c = theta_0``,
  ``tau_t = theta_t - theta_0``;
* ``method=adarank_cart`` (base CART, fusion_bench/merging/cart.py; the official ``merge_method: CART``):
  ``theta_c = theta_avg = theta_0 + mean_t tau_t``, ``tau_t = theta_t - theta_avg`` (centred).

A masked key ``k`` (2-D; which ones: ``keys`` below) splits each task vector into its ``r = min(rows, cols)``
singular components, ``tau_t[k] = sum_i s_i u_i v_i^T`` (``s_i`` descending), and::

    theta[k] = theta_c[k] + sum_t lambda_{t,k} sum_i b_{t,k,i} s_i u_i v_i^T,   b = 1[sigmoid(m_{t,k,i} / temp) > 0.5]

Every other float key: ``theta[k] = theta_c[k] + sum_t lambda_{t,k} tau_t[k]`` (AdaMerging's layer-wise form);
non-float keys are theta_0's. The mask logits ``m`` (``T x r`` per masked key) and the layer-wise coefficients
``lambda`` (``T x K`` over the ``K`` float keys) are learnt together by Adam on the loss of AdaMerging: the sum over
tasks of the mean Shannon entropy of each task's predictions (its own head) on a batch of unlabelled test inputs.
The mask is a straight-through estimator: the forward uses the hard mask ``b``, the backward the soft one's
gradient, ``d theta[k] / d m_i = lambda s_i u_i v_i^T sigmoid'(m_i / temp) / temp``, for kept and dropped components
alike (a dropped component can come back). The merged model uses the hard mask: component ``i`` is kept iff
``sigmoid(m_i / temp) > 0.5`` evaluated in fp32 (:func:`hard_mask`): ``m_i > 0``, except that a positive
``m_i / temp`` below about ``6e-8`` rounds to 0.5 and is dropped, as in the official code.

Official code and defaults
--------------------------
github.com/david3684/AdaRank: ``vision/src/models/merge_vit/adaptive.py`` (``AdaMergingModule``: ``_svd_vanilla``,
``_mask_init``, ``straight_through_mask``, ``_merge_weights``), ``vision/runner.py`` (``adaptive_merge_and_eval``)
and ``vision/configs/hydra_default.yaml`` under ``configs/adarank_{B,L}_T{8,14,20}/adarank_{TA,CART}.yaml``:

* Adam, betas (0.9, 0.999), no weight decay, lr 1e-3, over every parameter that requires grad: the mask logits AND
  ``lambda`` (``merge_weight``); 10,000 steps (ViT-L/14 with 14 or 20 tasks: 100,000); each step ONE batch per task
  (``tta_batch_size`` 16; ViT-L/14: 4 for 8 tasks, 2 for 14 / 20), mean entropy per batch, summed over tasks;
* ``mask_temp`` 10; the logits start at +0.1 (kept) for the first ``int(initial_rank_ratio * r)`` components and at
  -0.1 (dropped) for the rest (``initial_rank_ratio = 1``: all kept);
* TA: ``prior`` (lambda's start, every task and key) 0.3 and ``initial_rank_ratio`` 1.0 for ViT-B/32 with 8 and 14
  tasks (20 tasks: 0.05 and 1.0; ViT-L/14 with 20 tasks: 1.0 and 0.3): the start is task arithmetic at 0.3;
* CART: ``prior`` 2.3 and ``initial_rank_ratio`` 0.16 for ViT-B/32 with 8 tasks (14: 2.8 / 0.32, 20: 2.4 / 0.32;
  ViT-L/14: 3.0 / 0.16, 1.25 / 0.16, 1.0 / 0.16): the start is CART at those settings;
* ``lambda`` neither clamped (``clamp_weights: false``) nor normalised; the hard straight-through mask
  (``soft_mask: false``);
* masked keys: names containing ``attn`` or ``mlp`` and neither ``ln`` nor ``bias`` (open_clip: each block's
  ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``):
  ``keys="official"`` (T5 names: the block linear maps, as CART's ``official``); ``keys="all_2d"``: every 2-D key;
* ``torch.linalg.svd(full_matrices=False)`` of every masked key of every task vector: all ``r`` components, also
  for CART, whose start drops most of them (the masks may bring them back).

Paper, code and the choices made here
-------------------------------------
* The paper's full text could not be read here (only its abstract: per-component masks learnt by entropy
  minimisation); the code is followed. The code also learns ``lambda`` (its ``merge_weight`` requires grad and is
  in the optimiser): ``learn_coefs=True`` (default); ``learn_coefs=False`` keeps ``lambda`` at its start (masks
  only).
* The official runner evaluates the labelled test split every 500 steps and reports the BEST accuracy seen (a model
  chosen on test labels); here the model after the last step is the result (no labels are read).
* The official code has two bases, TA and CART; it has no Iso-CTS variant (nor TSV-M, TIES): none is offered.
* The start comes from the base's own settings, so that ``steps=0`` is exactly the base merge: ``lambda`` starts at
  ``method.scaling_coef`` (conf/method/adarank.yaml: 0.3; adarank_cart.yaml: 2.3, the official priors) unless
  ``coefficients.init`` is given; the kept components at ``method.rank_ratio`` for CART (adarank_cart.yaml: 0.16)
  and 1.0 for TA unless ``coefficients.initial_rank_ratio`` is given. The number kept is CART's
  ``max(1, int(ratio r))`` (0 for ratio 0): the official ``int(ratio r)`` (and ratio 0 read as ``1 / T``) differs
  only where ``ratio r < 1``.
* Batches: the pipeline's seeded passes over the split, each sample once per pass (the official DataLoader iterator
  also runs through shuffled epochs; its last batch of an epoch may be smaller).
* The components come from the float64 Gram matrix of the smaller side (fusion_bench/merging/spectral.py: exact to
  fp32 resolution), not an fp32 SVD: for ``rows >= cols`` ``tau^T tau = V diag(s^2) V^T`` and the left factor
  ``tau V = U diag(s)``; for ``rows < cols`` ``U`` and ``tau^T U = V diag(s)``. No ``1 / s`` appears and all ``r``
  components sum to ``tau`` exactly (up to fp32 rounding), also where ``s`` is numerically zero. Inside a cluster of
  equal singular values the components are one basis of the cluster, as any SVD's (the official code's too).
* Not implemented: the official half-precision and 8-bit Adam memory options, its soft-mask option.

Memory and cost
---------------
Per masked key and task the factors take ``(rows + cols) r`` fp32 numbers (1.25 x the task vector for a 3072 x 768
MLP weight, 2 x for a square one), the official ``U, s, V^T`` too; the other keys keep their task vectors, as
AdaMerging. The differentiable merge (:func:`merged_weights`) saves references to the factors, never copies; its
forward is one ``(rows x r) @ (r x cols)`` product per task and key, its backward one ``G V`` product per task and
key (``G`` the key's gradient) with a ``rows x r`` temporary. Like AdaMerging, every step back-propagates each batch
into the merged weights and then once through the merge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import track
from torch import Tensor
from torch.autograd.function import once_differentiable

from .adamerging import LogitsFn, entropy_and_grads
from .adamerging import merged_weights as combine
from .cart import cart_rank, is_official_key
from .registry import coefficient_method
from .spectral import eigh_many, gram
from .task_vectors import StateDict, is_number, prepare

log = logging.getLogger(__name__)

# method=adarank / adarank_cart: conf/method/<name>.yaml composes the base config with coefficients=adarank
coefficient_method("adarank", base="task_arithmetic", strategy="adarank")
coefficient_method("adarank_cart", base="cart", strategy="adarank")

#: the bases of the official code (module doc): the merging function's name -> the centre it merges around
BASES = {"task_arithmetic": "theta_0", "cart": "theta_avg"}
#: what ``keys`` may be (module doc)
KEY_SETS = ("official", "all_2d")


def hard_mask(logits: Tensor, temp: float) -> Tensor:
    """The official rule: component kept iff ``sigmoid(logit / temp) > 0.5``, evaluated in fp32 (bool tensor)."""
    return torch.sigmoid(logits.to(torch.float32) / float(temp)) > 0.5


def masked_keys(pretrained: Mapping[str, Tensor], keys: str = "official") -> list[str]:
    """The keys whose singular components get masks (module doc), in ``pretrained`` order. ``ValueError`` for an
    unknown ``keys`` or an ``official`` set that selects none of the 2-D keys (AdaRank would be AdaMerging)."""
    if keys not in KEY_SETS:
        raise ValueError(f"adarank: keys={keys!r} must be 'official' (the official code: keys named like attn / mlp "
                         f"weights) or 'all_2d' (every 2-D key)")
    two_d = [k for k, v in pretrained.items() if v.is_floating_point() and v.dim() == 2 and v.numel() > 0]
    if keys == "all_2d":
        return two_d
    chosen = [k for k in two_d if is_official_key(k)]
    if not chosen:
        raise ValueError(f"adarank: keys='official' selects none of the {len(two_d)} 2-D keys of this merge space "
                         f"(e.g. {two_d[:3]}): the official code masks keys named like open_clip's "
                         f"'...attn.in_proj_weight' or '...mlp.c_fc.weight'; set coefficients.keys=all_2d to mask "
                         f"every 2-D key")
    return chosen


def factors_of(taus: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(left, right)`` of each 2-D ``tau`` (float64 in): ``tau = left @ right.T`` summed over its ``r =
    min(rows, cols)`` singular components ``left[:, i] right[:, i]^T = s_i u_i v_i^T``, ``s_i`` descending; the
    eigendecompositions of the Gram matrices (float64) run in spectral's thread pool (module doc)."""
    out = []
    for tau, (_, Q) in zip(taus, eigh_many([gram(t) for t in taus])):
        if tau.shape[0] >= tau.shape[1]:  # tau^T tau = V diag(s^2) V^T: tau V = U diag(s)
            out.append((tau @ Q, Q))
        else:  # tau tau^T = U diag(s^2) U^T: tau^T U = V diag(s)
            out.append((Q, tau.T @ Q))
    return out


@dataclass
class AdaRankInputs:
    """What AdaRank learns over (module doc): the centre, the task vectors of the unmasked float keys and the
    singular factors of the masked ones, in ``dtype`` (fp32) on one device."""

    centre: dict[str, Tensor]  # theta_c on the float keys, theta_0's tensors on the others; pretrained key order
    task_vectors: list[dict[str, Tensor]]  # per task: tau_t of the float keys NOT masked
    factors: dict[str, list[tuple[Tensor, Tensor]]]  # masked key -> per task (left, right), tau_t = left @ right.T
    keys: list[str]  # every float key (the columns of lambda), pretrained order
    masked: list[str]  # the masked keys, pretrained order
    dtypes: dict[str, torch.dtype]  # the pretrained dtypes (of the merged model)
    base: str = "task_arithmetic"

    @property
    def n_tasks(self) -> int:
        return len(self.task_vectors)

    def rank(self, key: str) -> int:
        """``r = min(rows, cols)``: the components of a masked key."""
        return self.factors[key][0][0].shape[1]


def prepare_adarank(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    base: str = "task_arithmetic",
    keys: str = "official",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> AdaRankInputs:
    """The centre, task vectors and factors of every masked key (module doc), key by key: the T task vectors of one
    key exist in float64 at a time (on ``device``, default: where the weights are); kept in ``dtype``.

    ``base``: ``"task_arithmetic"`` (centre theta_0) or ``"cart"`` (centre theta_avg, task vectors centred there:
    centring in float64, as fusion_bench/merging/cart.py)."""
    if base not in BASES:
        raise ValueError(f"adarank: base={base!r} must be one of {list(BASES)} (the official code's TA and CART)")
    inp = prepare(pretrained, finetuned, "adarank")
    floats = set(inp.float_keys)
    masked = set(masked_keys({k: torch.empty(inp.shapes[k], dtype=inp.dtypes[k], device="meta") for k in inp.keys},
                             keys))
    T = inp.n
    centre: dict[str, Tensor] = {}
    tvs: list[dict[str, Tensor]] = [{} for _ in range(T)]
    factors: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for key in inp.keys:
        pre = inp.pretrained[key]
        dev = pre.device if device is None else torch.device(device)
        if key not in floats:  # non-float: theta_0's own tensor
            centre[key] = pre.to(dev)
            continue
        p64 = pre.to(dev, torch.float64, copy=True)
        X = [ft[key].to(dev, torch.float64, copy=True).sub_(p64) for ft in inp.finetuned]
        if base == "cart":
            mean = X[0].clone()
            for x in X[1:]:
                mean.add_(x)
            mean.div_(T)
            for x in X:
                x.sub_(mean)
            p64.add_(mean)
            del mean
        centre[key] = p64.to(dtype)
        if key in masked:
            factors[key] = [(a.to(dtype), b.to(dtype)) for a, b in factors_of(X)]
        else:
            for t, x in enumerate(X):
                tvs[t][key] = x.to(dtype)
        del X, p64
    order = [k for k in inp.float_keys if k in masked]
    return AdaRankInputs(centre, tvs, factors, list(inp.float_keys), order, dict(inp.dtypes), base)


class _MaskedCombine(torch.autograd.Function):
    """``centre + sum_t lam[t] * left_t diag(1[soft_t > 0.5]) right_t^T`` for one key, straight-through in ``soft``:
    the gradient of ``soft[t, i]`` is that of the component's scale, ``lam[t] <G, left_t[:, i] right_t[:, i]^T>``.
    Saves references to the factors, never copies."""

    @staticmethod
    def forward(ctx, lam: Tensor, soft: Tensor, centre: Tensor, *factors: Tensor) -> Tensor:  # type: ignore[override]
        dtype = torch.promote_types(torch.promote_types(centre.dtype, torch.float32), factors[0].dtype)
        out = centre.to(dtype, copy=True)
        hard = (soft.detach() > 0.5).to(dtype)
        lam_d = lam.detach().to(device=out.device, dtype=dtype)
        for t in range(len(factors) // 2):
            left, right = factors[2 * t], factors[2 * t + 1]
            out.addmm_(left.to(dtype) * (lam_d[t] * hard[t]), right.to(dtype).T)
        ctx.save_for_backward(lam_d, hard, *factors)
        ctx.meta = (lam.dtype, lam.device, soft.dtype, soft.device)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        lam, hard, *factors = ctx.saved_tensors
        lam_dtype, lam_device, soft_dtype, soft_device = ctx.meta
        d = torch.stack([(factors[2 * t].to(g.dtype) * (g @ factors[2 * t + 1].to(g.dtype))).sum(0)
                         for t in range(len(factors) // 2)])  # d[t, i] = <G, left_ti right_ti^T>
        g_lam = (hard * d).sum(1).to(device=lam_device, dtype=lam_dtype) if ctx.needs_input_grad[0] else None
        g_soft = (lam[:, None] * d).to(device=soft_device, dtype=soft_dtype) if ctx.needs_input_grad[1] else None
        return (g_lam, g_soft, None, *([None] * len(factors)))


def merged_weights(inputs: AdaRankInputs, coefs: Tensor, soft: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The merged weights (module doc) at ``coefs`` (``lambda``, ``[T, K]`` over ``inputs.keys``) and the soft
    masks ``soft[key]`` (``[T, r]``, values in [0, 1]; the forward keeps component ``i`` iff ``soft > 0.5``),
    differentiable in both (straight-through in ``soft``). Float keys in fp32 (or the inputs' dtype), the other keys
    theta_0's tensors themselves."""
    T, K = inputs.n_tasks, len(inputs.keys)
    if tuple(coefs.shape) != (T, K):
        raise ValueError(f"adarank: coefs has shape {tuple(coefs.shape)}; expected ({T}, {K}) ({T} tasks x {K} "
                         f"float keys)")
    col = {k: j for j, k in enumerate(inputs.keys)}
    plain = [k for k in inputs.keys if k not in inputs.factors]
    out = combine(inputs.centre, inputs.task_vectors, coefs[:, [col[k] for k in plain]], plain)
    for key in inputs.masked:
        s = soft[key]
        if tuple(s.shape) != (T, inputs.rank(key)):
            raise ValueError(f"adarank: the mask of {key!r} has shape {tuple(s.shape)}; expected ({T}, "
                             f"{inputs.rank(key)}) ({T} tasks x its {inputs.rank(key)} singular components)")
        flat = [f for pair in inputs.factors[key] for f in pair]
        out[key] = _MaskedCombine.apply(coefs[:, col[key]], s, inputs.centre[key], *flat)
    return out


@dataclass
class AdaRankResult:
    """Learnt ``coefs`` (``lambda``, ``[T, K]`` over ``keys``), the hard masks (``[T, r]`` per masked key) and the
    loss per step."""

    coefs: Tensor
    keys: list[str]
    masks: dict[str, Tensor]
    entropy: list[float] = field(default_factory=list)  # loss / batches_per_task, before each step

    def kept(self) -> list[dict[str, int]]:
        """Per task: the components kept of each masked key."""
        T = self.coefs.shape[0]
        return [{k: int(m[t].sum()) for k, m in self.masks.items()} for t in range(T)]

    def weights(self, inputs: AdaRankInputs) -> dict[str, Tensor]:
        """The merged state dict at the learnt coefficients and hard masks, in the pretrained dtypes and key order."""
        with torch.no_grad():
            dev = inputs.centre[inputs.keys[0]].device
            soft = {k: m.to(device=dev, dtype=torch.float32) for k, m in self.masks.items()}
            w = merged_weights(inputs, self.coefs.to(dev), soft)
        floats = set(inputs.keys)
        return {k: w[k].to(inputs.dtypes[k]) if k in floats else w[k].clone() for k in inputs.centre}


def initial_logits(r: int, n_tasks: int, kept: int, magnitude: float = 0.1,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The official start: ``+magnitude`` for the first ``kept`` components, ``-magnitude`` for the others."""
    m = torch.full((n_tasks, r), float(magnitude), dtype=dtype)
    m[:, kept:] = -float(magnitude)
    return m


def _start(init: float | Sequence[float], T: int) -> Tensor:
    values = [init] * T if is_number(init) else list(init)
    if len(values) != T or not all(is_number(v) for v in values):
        raise ValueError(f"adarank: init={init!r} must be a number or one number per task ({T})")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def adarank(
    inputs: AdaRankInputs,
    logits_fn: LogitsFn,
    batches: Callable[[int, int], Any],
    *,
    init: float | Sequence[float] = 0.3,
    initial_rank_ratio: float = 1.0,
    steps: int = 10000,
    lr: float = 1e-3,
    mask_temp: float = 10.0,
    mask_init: float = 0.1,
    learn_coefs: bool = True,
    batches_per_task: int = 1,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> AdaRankResult:
    """Learn AdaRank's masks (and ``lambda``) by entropy minimisation (module doc; defaults: the official ViT-B/32
    8-task TA run).

    ``logits_fn(weights, t, inputs)`` gives task ``t``'s logits ``[B, C]`` at ``weights``; ``batches(i, t)`` the
    ``i``-th batch of task ``t``'s unlabelled inputs (step ``s`` asks for ``i = s * batches_per_task + j``).
    ``init``: lambda's start (one number, or one per task); ``initial_rank_ratio``: the share of each masked key's
    components kept at the start (``max(1, int(ratio r))``, 0 for 0: CART's rule). ``on_step(step, entropy)`` after
    each update. Everything on the inputs' device; the parameters in the inputs' dtype (fp32).
    """
    T = inputs.n_tasks
    if T == 0 or not inputs.keys:
        raise ValueError("adarank: nothing to merge (no task vectors, or no float keys)")
    if int(steps) < 0 or not lr > 0 or not mask_temp > 0 or not mask_init > 0:
        raise ValueError(f"adarank: steps={steps} must be >= 0 and lr={lr}, mask_temp={mask_temp}, "
                         f"mask_init={mask_init} > 0")
    if not 0.0 <= float(initial_rank_ratio) <= 1.0:
        raise ValueError(f"adarank: initial_rank_ratio={initial_rank_ratio} must be in [0, 1]")
    m = int(batches_per_task)
    if m < 1:
        raise ValueError(f"adarank: batches_per_task={batches_per_task} must be >= 1 (the official code: 1)")
    dev = inputs.centre[inputs.keys[0]].device
    dtype = torch.promote_types(inputs.centre[inputs.keys[0]].dtype, torch.float32)  # fp32 (fp64 inputs: fp64)
    lam = _start(init, T)[:, None].expand(T, len(inputs.keys)).to(dev, dtype, copy=True)
    logits = {k: initial_logits(inputs.rank(k), T, cart_rank(inputs.rank(k), float(initial_rank_ratio)),
                                mask_init, dtype).to(dev) for k in inputs.masked}
    params = ([lam] if learn_coefs else []) + list(logits.values())
    if int(steps) > 0 and not params:
        raise ValueError("adarank: nothing to learn: no masked key and learn_coefs=False")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0) if params else None

    def merge() -> dict[str, Tensor]:
        return merged_weights(inputs, lam, {k: torch.sigmoid(v / float(mask_temp)) for k, v in logits.items()})

    history: list[float] = []
    for step in track(range(int(steps)), description="AdaRank", transient=True, disable=not progress):
        tasks = [t for t in range(T) for _ in range(m)]
        xs = [batches(step * m + j, t) for t in range(T) for j in range(m)]
        loss, grads = entropy_and_grads(merge, params, inputs.keys, logits_fn, xs, tasks)
        loss /= m
        if opt is not None:
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            opt.step()
        history.append(loss)
        log.debug("AdaRank step %d: entropy %.6f", step, loss)
        if on_step is not None:
            on_step(step, loss)
    if history:
        log.info("AdaRank: entropy %.4f -> %.4f over %d steps", history[0], history[-1], len(history))
    masks = {k: hard_mask(v.detach(), mask_temp).cpu() for k, v in logits.items()}
    res = AdaRankResult(lam.detach().cpu(), list(inputs.keys), masks, history)
    kept = res.kept()
    total = sum(inputs.rank(k) for k in inputs.masked)
    log.info("AdaRank: components kept per task %s of %d", [sum(d.values()) for d in kept], total)
    return res
