"""Diagonal Fisher information of a model's parameters (the statistic Fisher merging needs).

``F[key] = (1/N) sum_i (d/d theta log p(y_i | x_i; theta))^2`` entry by entry: per-sample gradients,
squared, then averaged (not the square of a batch gradient).  ``y_i`` is drawn from the model's predictive
distribution (``target="sample"``, the default: one backward pass per sample, an unbiased estimate of the
expectation below) or is the label of the batch (``target="label"``, the "empirical" Fisher).
``target="expected"`` takes the expectation over the labels exactly, as Matena and Raffel's code does
(mmatena/model_merging ``fisher.py``, ``_compute_exact_fisher_for_batch``):
``F[key] = (1/N) sum_i sum_y p(y | x_i) (d/d theta log p(y | x_i; theta))^2``; it costs one backward pass per
class and sample (10 to 397 on the eight CLIP tasks), hence not the default.  Classifiers only: per sample one
forward, then the gradients of ``log_softmax`` of every class, ``chunk`` classes at a time (vmap over the
forward's vjp).

Per-sample gradients come from ``torch.func`` (``functional_call`` + ``vmap(grad)``) over chunks of
``chunk`` samples (default: as many as fit about 1 GiB of per-sample gradients, at most 8); this works through ``nn.MultiheadAttention`` (open_clip).  Should ``vmap`` fail for a
model, the remaining samples fall back to a plain per-sample loop of ``torch.autograd.grad`` (logged once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from fusion_bench.devices import eval_mode

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30  # default chunk: ViT-B/32 2 samples (3.1 GiB peak, 0.31 s/sample on 2 CPU cores; 8: 7.8 GiB, 0.6 s)
TARGETS = ("sample", "label", "expected")
LogLikelihood = Callable[[nn.Module, Any, Tensor], Tensor]
Sampler = Callable[[nn.Module, Any, torch.Generator], Tensor]


def classifier_log_likelihood(model: nn.Module, x: Any, y: Tensor) -> Tensor:
    """``log softmax(model(x))[i, y_i]`` per sample, fp32 (``model(x)``: logits ``[B, C]``)."""
    logits = model(x).float()
    return F.log_softmax(logits, dim=-1).gather(-1, y.reshape(-1, 1).long()).squeeze(-1)


def classifier_sample(model: nn.Module, x: Any, generator: torch.Generator) -> Tensor:
    """``y_i ~ softmax(model(x)_i)``, drawn on the CPU with ``generator`` (same draws on any device)."""
    logits = model(x)
    probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def classifier_log_probs(model: nn.Module, x: Any, y: Any = None) -> Tensor:
    """``log softmax(model(x))`` ``[B, C]`` in (at least) fp32; ``y`` is ignored (``target="expected"``)."""
    logits = model(x)
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _add_expected(
    log_probs: Callable[[dict[str, Tensor]], Tensor],
    wrt: dict[str, Tensor],
    leaves: dict[str, Tensor],
    sums: dict[str, Tensor],
    chunk: int,
    use_vmap: bool,
) -> bool:
    """Add one sample's ``sum_y p(y|x) (d log p(y|x))^2`` to ``sums``; returns whether vmap still works.

    ``log_probs(params)`` is the sample's ``[C]`` log-probabilities at ``params``.  One forward, then the vjp
    of each class's one-hot cotangent, ``chunk`` classes at a time; an autograd loop over classes if that fails.
    """
    done = 0
    if use_vmap:
        try:
            lp, vjp_fn = vjp(log_probs, wrt)
            p = lp.detach().float().exp()
            eye = torch.eye(lp.numel(), dtype=lp.dtype, device=lp.device)
            for c0 in range(0, lp.numel(), chunk):
                (g,) = vmap(vjp_fn)(eye[c0 : c0 + chunk])
                for k, gk in g.items():
                    sums[k].add_(torch.tensordot(p[c0 : c0 + chunk], gk.float().square(), dims=1))
                done = min(c0 + chunk, lp.numel())
        except Exception as err:  # noqa: BLE001 - a real error is raised again by the loop
            log.warning("diagonal_fisher: vmap failed (%s); per-class autograd loop instead", err)
        else:
            return True
    lp = log_probs(leaves)
    p = lp.detach().float().exp()
    for c in range(done, lp.numel()):
        grads = torch.autograd.grad(
            lp[c], list(leaves.values()), retain_graph=c + 1 < lp.numel(), allow_unused=True
        )
        for k, gk in zip(leaves, grads):
            if gk is not None:
                sums[k].add_(gk.float().square(), alpha=float(p[c]))
    return False


class _Call(nn.Module):
    """``log_likelihood(model, x, y)`` as a module, so that ``functional_call`` can swap the weights."""

    def __init__(self, model: nn.Module, fn: LogLikelihood) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: Any, y: Tensor) -> Tensor:
        return self.fn(self.model, x, y)


@contextmanager
def _keeps_ties(model: nn.Module):
    """Put every parameter and buffer back under each of its names afterwards: torch.func.functional_call
    (torch 2.14) unties a tied weight when a submodule is registered under two names (T5's `shared` is also
    `encoder.embed_tokens`; `lm_head.weight` is `shared.weight`), leaving a copy under one of them."""
    tensors = [(n, t) for n, t in model.named_parameters(remove_duplicate=False)]
    tensors += [(n, t) for n, t in model.named_buffers(remove_duplicate=False)]
    try:
        yield
    finally:
        for name, t in tensors:
            owner, _, leaf = name.rpartition(".")
            sub = model.get_submodule(owner)
            table = sub._parameters if leaf in sub._parameters else sub._buffers
            if table.get(leaf) is not t:
                table[leaf] = t


def _batch_len(x: Any) -> int:
    leaves = [t for t in tree_flatten(x)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("diagonal_fisher: the inputs of a batch hold no tensor (need a batch dimension 0)")
    return leaves[0].shape[0]


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor]],
    log_likelihood: LogLikelihood | None = None,
    keys: Collection[str] | None = None,
    target: str = "sample",
    seed: int = 0,
    epsilon: float = 0.0,
    chunk: int | None = None,
    progress: bool = False,
    sample: Sampler | None = None,
) -> tuple[dict[str, Tensor], int]:
    """``({key: mean_i g_i^2}, N)``: the diagonal Fisher of the parameters ``keys``, fp32, and ``N``.

    ``batches`` yields ``(x, y)``: ``x`` a tensor or a pytree (dict, tuple) of tensors with the sample
    dimension first, ``y`` the labels (any value, e.g. ``None``, for ``target="sample"``).
    ``log_likelihood(model, x, y) -> [B]`` is ``log p(y_i | x_i)`` per sample; ``None`` means a classifier
    (``model(x)`` gives logits ``[B, C]``).  For a sequence model pass e.g. the per-sample sum of the
    target tokens' log-probabilities.  ``target="sample"`` draws ``y = sample(model, x, generator)``
    (default: from the classifier's softmax) with one CPU ``torch.Generator`` seeded by ``seed``; a custom
    ``log_likelihood`` with ``target="sample"`` needs its own ``sample``.  ``target="expected"`` (classifiers
    only, ``y`` ignored) sums over every class ``y`` weighted by ``p(y | x)``; ``chunk`` then counts classes
    (per sample) instead of samples.  ``keys``: default every floating
    parameter; gradients are taken w.r.t. those only.  ``epsilon`` floors the result.  The model runs in
    eval mode (training flags restored afterwards); its parameters are not modified.
    """
    if target not in TARGETS:
        raise ValueError(f"diagonal_fisher: target must be one of {TARGETS}, got {target!r}")
    if target == "expected" and log_likelihood is not None:
        raise ValueError(
            "diagonal_fisher: target='expected' sums over the classes of a classifier's softmax (model(x) "
            "gives logits); with a custom log_likelihood use target='sample' (with `sample`) or 'label'"
        )
    if target == "sample" and sample is None:
        if log_likelihood is not None:
            raise ValueError(
                "diagonal_fisher: target='sample' with a custom log_likelihood needs `sample` "
                "(model, x, generator) -> y drawn from the model; or use target='label'"
            )
        sample = classifier_sample
    fn = classifier_log_probs if target == "expected" else log_likelihood or classifier_log_likelihood
    named = dict(model.named_parameters())
    if keys is None:
        keys = [k for k, p in named.items() if p.is_floating_point()]
    unknown = [k for k in keys if k not in named or not named[k].is_floating_point()]
    if unknown:
        raise ValueError(f"diagonal_fisher: key {unknown[0]!r} is not a floating parameter of the model")
    keys = list(dict.fromkeys(keys))
    if chunk is None:  # per-sample gradients of `chunk` samples live at once: about 1 GiB of them
        numel = sum(named[k].numel() for k in keys)
        chunk = max(1, min(8, CHUNK_BYTES // (4 * max(numel, 1))))
    if chunk < 1:
        raise ValueError(f"diagonal_fisher: chunk must be >= 1, got {chunk}")
    call = _Call(model, fn)
    wrt = {k: named[k].detach() for k in keys}
    # every other tensor once, under its first name: functional_call ties the aliases of a tied weight (T5's
    # shared / embed_tokens / lm_head) and refuses a value for more than one of them
    seen = {id(named[k]) for k in keys}
    frozen = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            frozen[f"model.{k}"] = t.detach()

    def ll_one(params: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        x, y = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, (x, y))
        full = {**frozen, **{f"model.{k}": v for k, v in params.items()}}
        return functional_call(call, full, (x, y)).sum()

    def log_probs_at(x1: Any) -> Callable[[dict[str, Tensor]], Tensor]:  # target="expected", one sample
        def log_probs(params: dict[str, Tensor]) -> Tensor:
            full = {**frozen, **{f"model.{k}": v for k, v in params.items()}}
            return functional_call(call, full, (x1, None)).reshape(-1)

        return log_probs

    per_sample = vmap(grad(ll_one), in_dims=(None, 0, 0))
    use_vmap = True
    leaves = {k: v.detach().requires_grad_(True) for k, v in wrt.items()}  # for the fallback loop
    sums = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in wrt.items()}
    gen = torch.Generator().manual_seed(int(seed))
    n = 0
    with eval_mode(model), _keeps_ties(model):
        for x, y in track(batches, description="Fisher", transient=True, disable=not progress):
            b = _batch_len(x)
            if target == "expected":
                with torch.enable_grad():
                    for i in range(b):
                        x1 = tree_map(lambda t, i=i: t[i : i + 1] if isinstance(t, Tensor) else t, x)
                        use_vmap = _add_expected(log_probs_at(x1), wrt, leaves, sums, chunk, use_vmap)
                n += b
                continue
            if target == "sample":
                with torch.no_grad():
                    y = sample(model, x, gen)
            elif not isinstance(y, Tensor):
                raise TypeError(
                    f"diagonal_fisher: target='label' needs a label tensor per batch, got {type(y)}"
                )
            for s in range(0, b, chunk):
                xs, ys = tree_map(lambda t, s=s: t[s : s + chunk] if isinstance(t, Tensor) else t, (x, y))
                if use_vmap:
                    try:
                        g = per_sample(wrt, xs, ys)
                    except Exception as err:  # noqa: BLE001 - a real error is raised again by the loop
                        log.warning(
                            "diagonal_fisher: vmap failed (%s); per-sample autograd loop instead", err
                        )
                        use_vmap = False
                    else:
                        for k, gk in g.items():
                            sums[k].add_(gk.float().square().sum(0))
                        continue
                for i in range(_batch_len(xs)):
                    xi, yi = tree_map(lambda t, i=i: t[i] if isinstance(t, Tensor) else t, (xs, ys))
                    ll = ll_one(leaves, xi, yi)
                    grads = torch.autograd.grad(ll, list(leaves.values()), allow_unused=True)
                    for k, gk in zip(leaves, grads):
                        if gk is not None:
                            sums[k].add_(gk.float().square())
            n += b
    if n <= 0:
        raise ValueError("diagonal_fisher: `batches` held no samples (N = 0)")
    return {k: v.div_(n).clamp_min_(epsilon) if epsilon > 0 else v.div_(n) for k, v in sums.items()}, n
