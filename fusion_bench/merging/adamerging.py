"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learnt by entropy minimisation.

``theta(lambda) = theta_0 + sum_t lambda_t tau_t`` (task-wise, ``coefs`` of shape ``[T]``) or
``theta_0 + sum_t lambda_{t,k} tau_t[k]`` per tensor ``k`` (layer-wise, ``[T, K]``).  Each step minimises
``sum_t sum_{j < m} mean_b H(softmax(logits_t(clamp(lambda), x_{t,j,b})))``: the SUM over tasks and over
``m = batches_per_task`` batches per task of each batch's mean Shannon entropy, with Adam (betas (0.9, 0.999),
no weight decay), start 0.3, lr 1e-3, 500 steps.  As in the reference, layer-wise coefficients cover every
floating tensor (every parameter of the encoder) and theta_0's own coefficient is fixed to 1.

Defaults follow the official code (EnnengYang/AdaMerging, ``src/main_{task,layer}_wise_adamerging.py``): each
step draws a freshly shuffled test loader of batch size 16 per task and adds the mean entropy of its first TWO
batches (``if i > 0: break``), so ``batches_per_task=2``; and it clamps in the forward
(``lambdas() = clamp(lambdas_raw, 0, 1)``; the raw parameters are never projected), so
``clamp_in_forward=True``: a raw coefficient outside the box gets zero gradient (torch's clamp passes the
gradient on the closed box, bounds included) and Adam's momentum carries it on, so it stays out (its value
used is the bound).  ``clamp_in_forward=False`` instead projects the raw coefficients back into the box after
each Adam step, so a coefficient on a bound still sees its gradient and can come back; the two give the same
iterates until a coefficient first leaves the box.  ``batches_per_task=1`` is FusionBench's single batch.
The pipeline (stages/coefficients/learn.py) draws the batches from seeded passes over the split, each sample once per pass,
where the official code reshuffles the whole split at every step.
The recorded ``entropy`` is the loss divided by ``batches_per_task`` (the sum over tasks of each task's mean
entropy), comparable across ``batches_per_task``.

AdaMerging++ runs the same learner over :func:`ties_task_vectors` (the reference's per-task
``selected_entries`` of ``ties_merging_split``, merge_func "dis-sum").
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

from .registry import coefficient_method
from .task_vectors import StateDict, Workspace, prepare, shrink_lambda, stream_blocks
from .ties import check_k, global_thresholds

log = logging.getLogger(__name__)

# method=adamerging / adamerging_pp: conf/method/<name>.yaml composes the base config with coefficients=adamerging
coefficient_method("adamerging", base="task_arithmetic", strategy="adamerging")
coefficient_method("adamerging_pp", base="ties", strategy="adamerging")  # AdaMerging++: over TIES

LogitsFn = Callable[[dict[str, Tensor], int, Any], Tensor]


class _Combine(torch.autograd.Function):
    """``base + sum_t c[t] * taus[t]`` in (at least) fp32; saves references to ``taus``, never copies."""

    @staticmethod
    def forward(ctx, c: Tensor, base: Tensor, *taus: Tensor) -> Tensor:  # type: ignore[override]
        dtype = torch.promote_types(torch.promote_types(base.dtype, torch.float32), c.dtype)
        out = base.to(dtype, copy=True)
        cc = c.detach().to(device=out.device, dtype=dtype)
        for t, tau in enumerate(taus):
            out.addcmul_(tau, cc[t])  # upcasts tau exactly, no temporary of tau's size
        ctx.save_for_backward(*taus)
        ctx.c_dtype, ctx.c_device = c.dtype, c.device
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        g = g.reshape(-1)
        grads = [torch.dot(g, tau.reshape(-1).to(g.dtype)) for tau in ctx.saved_tensors]
        gc = torch.stack(grads).to(device=ctx.c_device, dtype=ctx.c_dtype)
        return (gc, None, *([None] * len(grads)))


def _check(
    pretrained: StateDict, task_vectors: Sequence[StateDict], coefs: Tensor, keys: Sequence[str]
) -> None:
    n, k = len(task_vectors), len(keys)
    if n == 0:
        raise ValueError("adamerging: no task vectors given; pass one state dict of tau_t per task")
    if tuple(coefs.shape) not in ((n,), (n, k)):
        raise ValueError(
            f"adamerging: coefs has shape {tuple(coefs.shape)}; expected ({n},) (task-wise) or "
            f"({n}, {k}) (layer-wise: {n} task vectors x {k} keys)"
        )
    for key in keys:
        if key not in pretrained:
            raise ValueError(f"adamerging: key {key!r} is not in the pretrained state dict")
        shape = pretrained[key].shape
        for t, tv in enumerate(task_vectors):
            if key not in tv:
                raise ValueError(f"adamerging: key {key!r} is missing from task_vectors[{t}]")
            if tv[key].shape != shape:
                raise ValueError(
                    f"adamerging: key {key!r} has shape {tuple(tv[key].shape)} in task_vectors[{t}] "
                    f"but {tuple(shape)} in the pretrained state dict"
                )


def merged_weights(
    pretrained: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    coefs: Tensor,
    keys: Sequence[str],
) -> dict[str, Tensor]:
    """``theta_0 + sum_t lambda_t tau_t`` for ``keys`` (fp32; fp64 for fp64 inputs), differentiable in coefs.

    ``coefs``: ``[T]`` (task-wise) or ``[T, len(keys)]`` (layer-wise).  Keys of ``pretrained`` not in ``keys``
    are returned as the pretrained tensors themselves.  The task vectors are referenced, never copied: the
    extra memory is the merged weights (in backward, one key's upcast tau at a time for low-precision taus).
    """
    _check(pretrained, task_vectors, coefs, keys)
    col = {key: i for i, key in enumerate(keys)}
    out: dict[str, Tensor] = {}
    for key in pretrained:
        if key not in col:
            out[key] = pretrained[key]
            continue
        c = coefs if coefs.dim() == 1 else coefs[:, col[key]]
        out[key] = _Combine.apply(c, pretrained[key], *[tv[key] for tv in task_vectors])
    return out


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the Shannon entropy (nats) of ``softmax(logits)``; logits ``[B, C]``."""
    if logits.dim() != 2:
        raise ValueError(
            f"adamerging: logits_fn must return [batch, classes] logits, got {tuple(logits.shape)}"
        )
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(lp.exp() * lp).sum(-1).mean()


def entropy_and_grads(
    merge: Callable[[], Mapping[str, Tensor]],
    params: Sequence[Tensor],
    keys: Sequence[str],
    logits_fn: LogitsFn,
    inputs: Sequence[Any],
    tasks: Sequence[int] | None = None,
) -> tuple[float, list[Tensor]]:
    """Loss ``sum_i mean_entropy(logits_fn(merge(), tasks[i], inputs[i]))`` and its gradient in each of ``params``.

    ``merge()`` builds the merged weights differentiably in ``params`` (leaves that require grad); ``keys`` are the
    merged keys.  ``tasks[i]`` is the task of batch ``inputs[i]`` (default: batch ``i`` is task ``i``).  Batches are
    back-propagated one at a time into the merged weights (only one batch's activations are alive), then once
    through the merge: the task vectors (or their factors, AdaRank) are read once per step, not once per batch.
    A parameter the loss does not reach gets a zero gradient.  Shared by AdaMerging and AdaRank (merging/adarank.py).
    """
    tasks = list(range(len(inputs))) if tasks is None else list(tasks)
    if len(tasks) != len(inputs):
        raise ValueError(f"adamerging: {len(inputs)} input batches but {len(tasks)} task indices")
    with torch.enable_grad():
        w = merge()
        leaves = {k: w[k].detach().requires_grad_(True) for k in keys if w[k].requires_grad}
        weights = {**w, **leaves}
        total = 0.0
        for t, x in zip(tasks, inputs):
            ent = mean_entropy(logits_fn(weights, t, x))
            if ent.requires_grad:
                ent.backward(inputs=list(leaves.values()))
            total += float(ent.detach())
        used = [k for k in leaves if leaves[k].grad is not None]
        if not used:
            return total, [torch.zeros_like(p) for p in params]
        grads = torch.autograd.grad([w[k] for k in used], list(params), [leaves[k].grad for k in used],
                                    allow_unused=True)
    return total, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def entropy_loss_and_grad(
    pretrained: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    coefs: Tensor,
    keys: Sequence[str],
    logits_fn: LogitsFn,
    inputs: Sequence[Any],
    tasks: Sequence[int] | None = None,
) -> tuple[float, Tensor]:
    """Loss ``sum_i mean_entropy(logits_fn(theta(coefs), tasks[i], inputs[i]))`` and its gradient (coefs).

    ``tasks[i]`` is the task of batch ``inputs[i]`` (default: batch ``i`` is task ``i``); see
    :func:`entropy_and_grads` for how the batches are back-propagated.
    """
    c = coefs.detach().requires_grad_(True)
    total, (g,) = entropy_and_grads(lambda: merged_weights(pretrained, task_vectors, c, keys), [c], keys, logits_fn,
                                    inputs, tasks)
    return total, g


@dataclass
class AdaMergingResult:
    """Learnt coefficients (``[T]`` task-wise, ``[T, K]`` layer-wise over ``keys``) and the loss per step."""

    coefs: Tensor
    keys: list[str]
    entropy: list[float] = field(default_factory=list)  # loss / batches_per_task, before each step

    @property
    def layer_wise(self) -> bool:
        return self.coefs.dim() == 2

    def weights(
        self, pretrained: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The merged state dict at the learnt coefficients, in the pretrained dtypes and key order."""
        with torch.no_grad():
            dev = pretrained[self.keys[0]].device if self.keys else self.coefs.device
            w = merged_weights(pretrained, task_vectors, self.coefs.to(dev), self.keys)
        merged = set(self.keys)
        return {k: w[k].to(pretrained[k].dtype) if k in merged else pretrained[k].clone() for k in pretrained}


def adamerging(
    pretrained: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    logits_fn: LogitsFn,
    batches: Callable[[int, int], Any],
    *,
    layer_wise: bool = True,
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: tuple[float, float] = (0.0, 1.0),
    progress: bool = False,
    on_step: Callable[[int, float, Tensor], None] | None = None,
    keys: Sequence[str] | None = None,
    clamp_in_forward: bool = True,
    batches_per_task: int = 2,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients (see the module doc for the loss, the optimiser and clamping).

    ``logits_fn(weights, t, inputs)`` returns task ``t``'s logits ``[B, C]`` at ``weights``;
    ``batches(i, t)`` gives the ``i``-th batch of task ``t``'s unlabelled inputs: step ``s`` asks for
    ``i = s * batches_per_task + j``, ``j < batches_per_task``.  ``keys`` defaults to every floating key of
    ``pretrained``.  ``on_step(step, entropy, coefs)`` is called after each update with the step's recorded
    entropy and the clamped coefficients.  All tensors (pretrained, task vectors, what ``logits_fn`` needs) on
    one device; coefficients are fp32.
    """
    keys = [k for k in pretrained if pretrained[k].is_floating_point()] if keys is None else list(keys)
    if not keys:
        raise ValueError(
            "adamerging: no floating keys to merge; pass `keys` or a pretrained state dict with floats"
        )
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo <= float(init) <= hi:
        raise ValueError(f"adamerging: init={init} lies outside clamp={clamp}; start inside the box")
    if int(steps) < 0 or lr <= 0:
        raise ValueError(f"adamerging: steps={steps} must be >= 0 and lr={lr} > 0")
    m = int(batches_per_task)
    if m < 1:
        raise ValueError(f"adamerging: batches_per_task={batches_per_task} must be >= 1 (the reference: 2)")
    n = len(task_vectors)
    shape = (n, len(keys)) if layer_wise else (n,)
    raw = torch.full(shape, float(init), dtype=torch.float32, device=pretrained[keys[0]].device)
    _check(pretrained, task_vectors, raw, keys)
    raw.requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    history: list[float] = []
    for step in track(range(int(steps)), description="AdaMerging", transient=True, disable=not progress):
        eff = raw.detach().clamp(lo, hi)
        tasks = [t for t in range(n) for _ in range(m)]
        inputs = [batches(step * m + j, t) for t in range(n) for j in range(m)]
        loss, g = entropy_loss_and_grad(pretrained, task_vectors, eff, keys, logits_fn, inputs, tasks)
        loss /= m
        if clamp_in_forward:  # d clamp / d raw = 1 inside the box (bounds included), 0 outside
            g = g * ((raw.detach() >= lo) & (raw.detach() <= hi))
        raw.grad = g.to(raw.dtype)
        opt.step()
        if not clamp_in_forward:
            with torch.no_grad():
                raw.clamp_(lo, hi)
        history.append(loss)
        log.debug("AdaMerging step %d: entropy %.6f", step, loss)
        if on_step is not None:
            on_step(step, loss, raw.detach().clamp(lo, hi))
    if history:
        log.info("AdaMerging: entropy %.4f -> %.4f over %d steps", history[0], history[-1], len(history))
    return AdaMergingResult(raw.detach().clamp(lo, hi).cpu(), keys, history)


def ties_task_vectors(
    pretrained: StateDict, finetuned: Sequence[StateDict], k: float = 0.2
) -> list[dict[str, Tensor]]:
    """AdaMerging++ inputs: each TIES-trimmed task vector, zeroed where it disagrees with the elected sign.

    Trim as :func:`~fusion_bench.merging.ties.ties_merging` (exact top-``k`` |tau_t| over the whole
    flattened vector; ``k = 0.2`` is the reference's K=20), elect ``sign(sum_t trimmed_t)`` (zero sum: ``+``),
    keep the agreeing entries, and do NOT divide by the number of agreeing tasks: this is what the
    reference (``ties_merging_split``, merge_func "dis-sum") feeds to the learner (``selected_entries``).
    Hence coefficients all ``lambda`` give ``theta_0 + lambda * sum_t selected_t`` (TIES with disjoint SUM);
    house TIES (disjoint mean) is ``theta_0 + sum_t selected_t / #agreeing``.  Differences from the
    reference, only at exact ties: it keeps ``|tau| >=`` the (m+1)-th largest (kthvalue), here the m-th
    (as ties.py); its zero-sum sign is the majority of all elected signs.  Returns fp32 tensors of the
    floating keys only.
    """
    inp = prepare(pretrained, finetuned, "ties_task_vectors")
    check_k(k, "ties_task_vectors")
    k = float(k)
    shrinks = [0.0] * inp.n if k >= 1.0 else [shrink_lambda(v) for v in global_thresholds(inp, k)]
    outs = [
        {key: torch.empty(inp.shapes[key], dtype=torch.float32) for key in inp.float_keys} for _ in shrinks
    ]
    ws = Workspace()

    def visit(X: Tensor, key: str, s: int, e: int, p32: Tensor) -> None:
        for t, lmb in enumerate(shrinks):
            if lmb == float("inf"):
                X[t].zero_()
            elif lmb > 0.0:
                torch.ops.aten.hardshrink.out(X[t], lmb, out=X[t])
        S = torch.sum(X, 0, out=ws.get("S", e - s))
        el = torch.sign(S, out=ws.get("e", e - s)).add_(0.5).sign_()  # +1 where S >= 0
        X.mul_(el).clamp_(min=0.0).mul_(el)
        for t in range(inp.n):
            outs[t][key].view(-1)[s:e].copy_(X[t])

    stream_blocks(inp, visit)
    return outs
