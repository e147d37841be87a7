"""LoraHub (Huang et al., 2023): gradient-free weights over LoRA adapters.

The reference (sail-sg/lorahub, ``lorahub/algorithm.py``: ``get_score`` / ``get_final_weights``) composes the peft
state dicts of zero-B-initialised LoRA modules key by key, ``A = sum_t w_t A_t`` and ``B = sum_t w_t B_t`` (not
``sum_t w_t B_t A_t``), and runs the unmodified base at ``W0 + (alpha/r) B A``: ``w = 0`` is the pretrained model.
Here every key is combined around an *origin* adapter ``phi_o``::

    phi(w) = phi_o + sum_t w_t (phi_t - phi_o)                     (every key; at least fp32 arithmetic)

with ``phi_o`` an adapter at which the model is the pretrained one (:func:`lorahub_origin`), so that ``w = 0`` is
the pretrained model for every LoRA init and ``w = e_t`` is fine-tune ``t``:

- ``phi_o = 0`` when the zero adapter gives the pretrained model, i.e. ``B0 A0 = 0`` in every layer (peft's
  default init, B0 = 0: ``finetune.init=zero_b``): ``phi(w) = sum_t w_t phi_t``, the reference's composition
  exactly;
- ``phi_o = phi_0`` (the shared init) otherwise: ``finetune.init=compensated`` (the l_lora default) trains A and B
  from random ``A0, B0`` on a base offset to ``W0 - (alpha/r) B0 A0``, where the zero adapter is NOT the pretrained
  model but ``phi_0`` is.  The reference's composition there would start at, and its L1 term pull towards,
  ``W0 - (alpha/r) B0 A0``.  ``phi(w) = phi_0 + sum_t w_t (phi_t - phi_0)``: the task vectors of the adapters,
  one weight per task (``partial_linearization``'s merge, which has one coefficient for all tasks).

Rejected: LoraHub verbatim on each fine-tune written as a LoRA module of the unmodified base (the rank-2r module
``[B_t, -B0] [A_t; A0]`` that the T5 peft export writes) gives ``W0 + s((sum w B_t)(sum w A_t) - (sum w)^2 B0 A0)``;
it also starts at W0 and reduces to the reference for B0 = 0, but its result has rank 2r, which the rank-r
adapters the pipeline evaluates, exports and linearizes cannot hold.

The weights minimise ``loss_fn(combine_adapters(adapters, w, origin)) + l1 * mean_t |w_t|`` with nevergrad's NGOpt
over an ``Array`` of ``n`` weights, start 0, bounds ``[-bound, bound]``, ``budget`` evaluations (defaults 40, 1.5,
0.05 as in ``sail-sg/lorahub``).  The L1 term is the reference's ``default_l1_regularization``:
``0.05 * sum|w| / len(w)``, the MEAN of ``|w_t|`` (the paper's text reads like a sum); it pulls towards ``w = 0``,
the pretrained model.

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

from .registry import coefficient_method

log = logging.getLogger(__name__)

# method=lorahub: conf/method/lorahub.yaml composes task_arithmetic with coefficients=lorahub
coefficient_method("lorahub", base="task_arithmetic", strategy="lorahub")


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


def _check_origin(first: Mapping[str, Tensor], origin: Mapping[str, Tensor] | None) -> None:
    if origin is None:
        return
    if set(origin) != set(first):
        diff = sorted(set(origin) ^ set(first))
        raise ValueError(
            f"lorahub: the origin and the adapters have different keys (e.g. {diff[0]!r}); the origin is the "
            "adapters' initial value phi_0 (same LoRA config)"
        )
    for k, v in origin.items():
        if v.shape != first[k].shape:
            raise ValueError(
                f"lorahub: key {k!r} has shape {tuple(v.shape)} in the origin but {tuple(first[k].shape)} in "
                "adapters[0]"
            )


def combine_adapters(
    adapters: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    origin: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``origin[key] + sum_t w_t (adapters[t][key] - origin[key])`` for every key; without ``origin`` (the zero
    adapter) ``sum_t w_t adapters[t][key]`` (fp32 arithmetic, returned in adapters[0]'s dtypes).  At ``w = 0``
    the result is ``origin`` exactly (zeros without it)."""
    keys = _check_adapters(adapters)
    w = [float(x) for x in weights]
    if len(w) != len(adapters):
        raise ValueError(
            f"lorahub: {len(w)} weights for {len(adapters)} adapters; give one weight per adapter"
        )
    _check_origin(adapters[0], origin)
    out: dict[str, Tensor] = {}
    for k in keys:
        ref = adapters[0][k]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        if origin is None:
            acc = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
            for wt, ad in zip(w, adapters):
                acc.add_(ad[k], alpha=wt)
        else:
            o = origin[k].to(device=ref.device, dtype=dtype)
            acc = o.clone()
            for wt, ad in zip(w, adapters):
                acc.add_(ad[k].to(dtype) - o, alpha=wt)
        out[k] = acc.to(ref.dtype)
    return out


def lorahub_origin(phi0: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The origin of LoraHub's combination (module doc) for adapters trained from ``phi0``: None (the zero
    adapter) when ``B0 A0 = 0`` in every layer, else ``phi0``.  Keys pair as ``<layer>.lora_A.<rest>`` with
    ``<layer>.lora_B.<rest>`` (peft's names)."""
    pairs = []
    for k, a in phi0.items():
        if ".lora_A." in k:
            kb = k.replace(".lora_A.", ".lora_B.", 1)
            if kb not in phi0:
                raise KeyError(f"lorahub: {k!r} has no {kb!r} in the initial adapters")
            pairs.append((a, phi0[kb]))
        elif ".lora_B." not in k:
            raise KeyError(f"lorahub: {k!r} is no LoRA adapter (lora_A / lora_B)")
    if not pairs:
        raise ValueError("lorahub: the initial adapters hold no lora_A / lora_B pair")
    zero_is_pretrained = all(not torch.any(b.double() @ a.double()) for a, b in pairs)
    return None if zero_is_pretrained else dict(phi0)


def l1_penalty(weights: Sequence[float], l1: float) -> float:
    """The reference's L1 term: ``l1 * mean_t |w_t|``."""
    return l1 * sum(abs(float(x)) for x in weights) / len(weights)


@dataclass
class LoraHubResult:
    weights: list[float]  # best evaluated weights
    objective: float  # loss + l1 penalty at `weights`
    loss: float  # loss_fn at `weights`, without the penalty
    adapters: dict[str, Tensor]  # combine_adapters(adapters, weights, origin)
    history: list[tuple[list[float], float]] = field(
        default_factory=list
    )  # (weights, objective) per evaluation


def lorahub(
    adapters: Sequence[Mapping[str, Tensor]],
    loss_fn: Callable[[dict[str, Tensor]], float],
    *,
    origin: Mapping[str, Tensor] | None = None,
    budget: int = 40,
    bound: float = 1.5,
    l1: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> LoraHubResult:
    """Search LoraHub weights with NGOpt (module doc); ``loss_fn`` maps a combined adapter to a float.

    ``origin``: the adapter that ``w = 0`` gives (:func:`lorahub_origin` of the adapters' init; None: zero)."""
    try:
        import nevergrad as ng
    except ImportError as e:
        raise ImportError("lorahub needs nevergrad: pip install nevergrad") from e
    _check_adapters(adapters)
    _check_origin(adapters[0], origin)
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
            # nevergrad's COBYLA (scipy >= 1.16) asks for a final trust radius above the initial one; scipy clamps
            # it and says so on every run
            warnings.filterwarnings("ignore", "COBYLA: Invalid RHOEND", UserWarning)
            best = _search(opt, adapters, origin, loss_fn, budget, bound, l1, progress, history)
    finally:
        np.random.set_state(outer)
    log.info("LoraHub: best objective %.6f (loss %.6f) at weights %s", best[0], best[1], best[2])
    return LoraHubResult(best[2], best[0], best[1], combine_adapters(adapters, best[2], origin), history)


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


def _search(opt, adapters, origin, loss_fn, budget: int, bound: float, l1: float, progress: bool,
            history: list) -> tuple[float, float, list[float]]:
    best: tuple[float, float, list[float]] | None = None  # (objective, loss, weights)
    for _ in track(range(int(budget)), description="LoraHub", transient=True, disable=not progress):
        cand = opt.ask()
        w = [min(max(float(x), -bound), bound) for x in np.asarray(cand.value, dtype=float).reshape(-1)]
        loss = float(loss_fn(combine_adapters(adapters, w, origin)))
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
