"""DARE (Yu et al., 2024): Drop And REscale task vectors, then task arithmetic or TIES.

Each entry of each ``tau_t`` is dropped with probability ``p`` and survivors are divided by
``1 - p`` (``rescale=True``).  The mask of (task ``t``, key) is
``torch.bernoulli(torch.full((numel,), 1 - p), generator=torch.Generator().manual_seed(s))`` with
``s = derived_seed(seed, t, key)``: the same call as peft's ``random_pruning`` under
``torch.manual_seed(s)``, reproducible across runs and processes and independent of the other keys
and tasks (so masks can be regenerated instead of stored, e.g. for the two passes of global TIES).

``base="ties"``: TIES on the dropped vectors.  Its ``k`` defaults to 1.0 (no magnitude trim, DARE's
random drop replaces it: the convention of peft's ``dare_ties`` and MergeKit); pass ``k < 1`` to trim too.
The reference framework differs (FusionBench ``DareTiesMerging``, ``config/method/dare/ties_merging.yaml``):
p=0.5, then a top-20% trim of each dropped vector over all its entries (``threshold: 20``, = ``k=0.2`` here),
disjoint SUM (``merge_func: sum``; here the disjoint mean of ties.py, no sum option), lambda 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fusion_bench.errors import ConfigError
from fusion_bench.validation.ranges import (
    FLAG,
    ONE_COEF,
    PER_TASK_COEF,
    TORCH_SEED,
    Context,
    choice,
    fraction,
)

from .registry import merging_method
from .task_arithmetic import weighted_sum_merge
from .task_vectors import StateDict, Transform, derived_seed, is_number, prepare, scalar_coef, scaling_coefs
from .ties import KEPT_FRACTION, check_k, ties_merge


def dare_mask(seed: int, t: int, key: str, numel: int, p: float) -> Tensor:
    """Keep-mask (bool, flat) of task ``t``'s entries of ``key``; deterministic in (seed, t, key)."""
    g = torch.Generator().manual_seed(derived_seed(seed, t, key))
    return torch.bernoulli(torch.full((numel,), 1.0 - p, dtype=torch.float32), generator=g).bool()


class DareDrop(Transform):
    """Random drop + rescale, applied to task vectors in flight."""

    def __init__(self, p: float, seed: int, rescale: bool = True):
        self.p, self.seed, self.rescale = float(p), int(seed), bool(rescale)
        self.density = 1.0 - self.p
        self._key: str | None = None
        self._masks: dict[int, Tensor] = {}

    def mask(self, t: int, key: str, numel: int) -> Tensor:
        if key != self._key:  # keys-outer passes reuse a key's masks over its chunks
            self._key, self._masks = key, {}
        if t not in self._masks:
            self._masks[t] = dare_mask(self.seed, t, key, numel, self.p)
        return self._masks[t]

    def row(self, t: int, key: str, numel: int, start: int, end: int, x: Tensor) -> None:
        if self.p == 0.0:
            return
        x.mul_(self.mask(t, key, numel)[start:end])
        if self.rescale:
            x.div_(self.density)


@merging_method("dare", "dare_ties", kind="data-free", affine=True)  # base=task_arithmetic | ties
def dare(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    p: float = 0.9,
    seed: int = 0,
    base: str = "task_arithmetic",
    rescale: bool = True,
    scaling_coef: float | Sequence[float] = 0.3,
    **base_kwargs: Any,
) -> dict[str, Tensor]:
    """DARE then ``base`` (``"task_arithmetic"`` or ``"ties"``).

    ``scaling_coef`` and ``base_kwargs`` go to the base method: for task arithmetic a float or
    one float per task; for TIES one float, plus ``k`` (default 1.0 here) and ``per_tensor``.
    """
    inp = prepare(pretrained, finetuned, "dare")
    if not is_number(p) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"dare: p={p!r} is the drop probability and must be in [0, 1)")
    drop = DareDrop(float(p), seed, rescale)
    if base in ("task_arithmetic", "ta"):
        if base_kwargs:
            raise TypeError(f"dare(base='task_arithmetic') got unexpected arguments {sorted(base_kwargs)}")
        return weighted_sum_merge(inp, scaling_coefs(scaling_coef, inp.n, "dare"), transform=drop)
    if base == "ties":
        k = base_kwargs.pop("k", 1.0)
        per_tensor = bool(base_kwargs.pop("per_tensor", False))
        if base_kwargs:
            raise TypeError(f"dare(base='ties') got unexpected arguments {sorted(base_kwargs)}")
        check_k(k, "dare(base='ties')")
        return ties_merge(inp, float(k), scalar_coef(scaling_coef, "dare"), per_tensor, transform=drop)
    raise ValueError(f"dare: base={base!r} must be 'task_arithmetic' or 'ties'")

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
TIES_ONLY = ("k", "per_tensor")


def _dare_ranges(settings: dict) -> dict:
    """base=ties takes one scaling_coef, base=task_arithmetic one or one per task; k and per_tensor are TIES's
    (refused with base=task_arithmetic by _check_dare_settings)."""
    ties = settings.get("base", "task_arithmetic") == "ties"
    return {
        "p": fraction(high_open=True, note="the drop probability; 1 would drop every entry"),
        "seed": TORCH_SEED,  # hashed with the task and key (derived_seed)
        "base": choice("task_arithmetic", "ta", "ties"),
        "rescale": FLAG,
        "scaling_coef": ONE_COEF if ties else PER_TASK_COEF,
        "k": KEPT_FRACTION,
        "per_tensor": FLAG,
    }


def _check_dare_settings(settings: dict, ctx: Context) -> None:
    base = settings.get("base", "task_arithmetic")
    given = [k for k in TIES_ONLY if k in settings]
    if base != "ties" and given:
        raise ConfigError(f"method.{given[0]}={settings[given[0]]!r}: a setting of dare with base=ties, not with "
                          f"base={base}")


dare.ranges = _dare_ranges
dare.check_settings = _check_dare_settings
