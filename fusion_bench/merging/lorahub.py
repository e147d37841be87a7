"""LoraHub (Huang et al., 2023): gradient-free weights over LoRA adapters.

The composed adapter is the weighted sum of every key separately: ``A = sum_t w_t A_t`` and
``B = sum_t w_t B_t`` (not ``sum_t w_t B_t A_t``).  The weights minimise
``loss_fn(combine_adapters(adapters, w)) + l1 * mean_t |w_t|`` with nevergrad's NGOpt over an ``Array`` of
``n`` weights, start 0, bounds ``[-bound, bound]``, ``budget`` evaluations (defaults 40, 1.5, 0.05 as in
``sail-sg/lorahub``).  The L1 term is the reference's ``default_l1_regularization``:
``0.05 * sum|w| / len(w)``, the MEAN of ``|w_t|`` (the paper's text reads like a sum).

Differences from the reference: the result is the best evaluated point (the objective is deterministic, so
it is known exactly and at least as good as every evaluation) instead of NGOpt's recommendation, and
nevergrad is seeded through ``parametrization.random_state`` instead of numpy's global generator.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import track
from torch import Tensor

log = logging.getLogger(__name__)


def _check_adapters(adapters: Sequence[Mapping[str, Tensor]]) -> list[str]:
    if isinstance(adapters, Mapping) or not adapters:
        raise ValueError(
            "lorahub: `adapters` must be a non-empty sequence of LoRA state dicts (one per adapter)"
        )
    keys = list(adapters[0].keys())
    for i, ad in enumerate(adapters[1:], start=1):
        missing = [k for k in keys if k not in ad]
        extra = [k for k in ad if k not in adapters[0]]
        if missing or extra:
            what = (
                f"key {missing[0]!r} of adapters[0] is missing" if missing else f"key {extra[0]!r} is extra"
            )
            raise ValueError(
                f"lorahub: {what} in adapters[{i}]; all adapters need the same keys (same LoRA config)"
            )
    for k in keys:
        ref = adapters[0][k]
        if not ref.is_floating_point():
            raise TypeError(f"lorahub: key {k!r} is {ref.dtype}; LoRA adapters hold floating tensors only")
        for i, ad in enumerate(adapters[1:], start=1):
            if ad[k].shape != ref.shape:
                raise ValueError(
                    f"lorahub: key {k!r} has shape {tuple(ad[k].shape)} in adapters[{i}] but "
                    f"{tuple(ref.shape)} in adapters[0]; adapters of other ranks or target modules "
                    "cannot be combined"
                )
    return keys


def combine_adapters(adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_t w_t adapters[t][key]`` for every key (fp32 arithmetic, returned in adapters[0]'s dtypes)."""
    keys = _check_adapters(adapters)
    w = [float(x) for x in weights]
    if len(w) != len(adapters):
        raise ValueError(
            f"lorahub: {len(w)} weights for {len(adapters)} adapters; give one weight per adapter"
        )
    out: dict[str, Tensor] = {}
    for k in keys:
        ref = adapters[0][k]
        acc = torch.zeros(ref.shape, dtype=torch.promote_types(ref.dtype, torch.float32), device=ref.device)
        for wt, ad in zip(w, adapters):
            acc.add_(ad[k], alpha=wt)
        out[k] = acc.to(ref.dtype)
    return out


def l1_penalty(weights: Sequence[float], l1: float) -> float:
    """The reference's L1 term: ``l1 * mean_t |w_t|``."""
    return l1 * sum(abs(float(x)) for x in weights) / len(weights)


@dataclass
class LoraHubResult:
    weights: list[float]  # best evaluated weights
    objective: float  # loss + l1 penalty at `weights`
    loss: float  # loss_fn at `weights`, without the penalty
    adapters: dict[str, Tensor]  # combine_adapters(adapters, weights)
    history: list[tuple[list[float], float]] = field(
        default_factory=list
    )  # (weights, objective) per evaluation


def lorahub(
    adapters: Sequence[Mapping[str, Tensor]],
    loss_fn: Callable[[dict[str, Tensor]], float],
    *,
    budget: int = 40,
    bound: float = 1.5,
    l1: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> LoraHubResult:
    """Search LoraHub weights with NGOpt (module doc); ``loss_fn`` maps a combined adapter to a float."""
    try:
        import nevergrad as ng
    except ImportError as e:
        raise ImportError("lorahub needs nevergrad: pip install nevergrad") from e
    _check_adapters(adapters)
    n = len(adapters)
    if int(budget) < 1 or not bound > 0 or l1 < 0:
        raise ValueError(f"lorahub: budget={budget} must be >= 1, bound={bound} > 0 and l1={l1} >= 0")
    history: list[tuple[list[float], float]] = []
    # nevergrad's random states (the parametrization's, and those of the optimizers NGOpt picks) come from
    # numpy's global generator: seed it for the search, then give it back
    outer = np.random.get_state()
    np.random.seed(int(seed))
    try:
        param = ng.p.Array(init=np.zeros(n), lower=-float(bound), upper=float(bound))
        param.random_state.seed(int(seed))
        opt = ng.optimizers.NGOpt(parametrization=param, budget=int(budget))
        with _cma_default_seed(int(seed) + 1), warnings.catch_warnings():
            # nevergrad 1.0.12's MetaModel: float() of a 1-element array
            warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
            best = _search(opt, adapters, loss_fn, budget, bound, l1, progress, history)
    finally:
        np.random.set_state(outer)
    log.info("LoraHub: best objective %.6f (loss %.6f) at weights %s", best[0], best[1], best[2])
    return LoraHubResult(best[2], best[0], best[1], combine_adapters(adapters, best[2]), history)


@contextmanager
def _cma_default_seed(seed: int):
    """NGOpt's MetaModel may run CMA-ES (the `cma` package) through nevergrad, which calls cma.fmin without a
    seed; cma then reseeds numpy from the clock. For the search, cma's default seed is `seed` instead."""
    try:
        from cma import options_parameters
    except ImportError:  # NGOpt without cma installed never picks it
        yield
        return
    defaults = options_parameters.cma_default_options
    before = defaults["seed"]
    defaults["seed"] = seed
    try:
        yield
    finally:
        defaults["seed"] = before


def _search(opt, adapters, loss_fn, budget: int, bound: float, l1: float, progress: bool,
            history: list) -> tuple[float, float, list[float]]:
    best: tuple[float, float, list[float]] | None = None  # (objective, loss, weights)
    for _ in track(range(int(budget)), description="LoraHub", transient=True, disable=not progress):
        cand = opt.ask()
        w = [min(max(float(x), -bound), bound) for x in np.asarray(cand.value, dtype=float).reshape(-1)]
        loss = float(loss_fn(combine_adapters(adapters, w)))
        if not math.isfinite(loss):
            raise ValueError(
                f"lorahub: loss_fn returned {loss} at weights {w}; it must return a finite float"
            )
        obj = loss + l1_penalty(w, l1)
        opt.tell(cand, obj)
        history.append((w, obj))
        if best is None or obj < best[0]:
            best = (obj, loss, w)
    assert best is not None
    return best
