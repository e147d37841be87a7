"""Task-specific merge results: shared weights plus a small per-task part (TALL masks, EMR).

Methods of this family (:func:`~fusion_bench.merging.consensus.tall_masks`,
:func:`~fusion_bench.merging.emr.emr_merging`) do not return one state dict.  They return a
:class:`TaskSpecificMerge`: one shared fp32 vector ``v`` (per float key), one binary mask ``m_t``
per task and one scalar rescaler ``l_t`` per task, and task ``t`` uses

    theta_t = theta_0 + l_t * (m_t * v)

(TALL masks: ``v = tau_MTL``, ``l_t = 1``; EMR: ``v = tau_uni``, ``l_t`` its rescaler).

Memory: ``v`` is held once in fp32 (4 bytes per parameter); the masks are ``torch.bool`` (one byte
per entry and task in memory), one ``(n_tasks, *shape)`` tensor per key; ``pretrained`` is kept as
the mapping it was given (a :class:`~fusion_bench.merging.lazy.LazyStateDict` stays lazy), and
:meth:`TaskSpecificMerge.task_weights` materialises one task's state dict at a time.

Storage accounting (what the report shows): a mask costs 1 bit per entry when stored packed (as
the papers count it), a stored rescaler 32 bits; :meth:`~TaskSpecificMerge.bits_per_parameter`
gives what task ``t`` adds beyond the shared vector, per parameter of the merged float keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .lazy import LazyStateDict


def _dtype(mapping: Mapping[str, Tensor], key: str) -> torch.dtype:
    if isinstance(mapping, LazyStateDict):
        return mapping.dtype(key)
    return mapping[key].dtype


def _bits(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 8
    return (torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)).bits


@dataclass
class TaskSpecificMerge:
    """Shared vector + per-task binary masks and rescalers; task ``t`` is ``theta_0 + l_t * m_t * v``.

    Attributes:
        pretrained: the pretrained state dict (a reference, e.g. a ``LazyStateDict``; not copied).
        shared: float key -> fp32 tensor ``v`` (the key's shape).
        masks: float key -> bool tensor of shape ``(n_tasks, *key_shape)``; ``masks[key][t]`` is ``m_t``.
        rescalers: one float ``l_t`` per task (1.0 for TALL masks).
        method: name of the method that produced it (for reports).
        rescaler_bits: bits a stored rescaler costs: 32 for EMR; 0 for TALL masks, whose
            ``l_t = 1`` is fixed and never stored.
        keys: all keys in output order (default: the pretrained mapping's order); non-float keys
            are copied from ``pretrained``.
    """

    pretrained: Mapping[str, Tensor]
    shared: dict[str, Tensor]
    masks: dict[str, Tensor]
    rescalers: list[float]
    method: str = "task_specific"
    rescaler_bits: int = 32
    keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = list(self.pretrained.keys())
        self.rescalers = [float(r) for r in self.rescalers]
        n = len(self.rescalers)
        if set(self.shared) != set(self.masks):
            raise ValueError(f"{self.method}: shared vector and masks cover different keys")
        for key, v in self.shared.items():
            m = self.masks[key]
            if v.dtype != torch.float32:
                raise ValueError(f"{self.method}: shared[{key!r}] must be fp32, got {v.dtype}")
            if m.dtype != torch.bool or tuple(m.shape) != (n, *v.shape):
                raise ValueError(
                    f"{self.method}: masks[{key!r}] must be a bool tensor of shape {(n, *v.shape)}, "
                    f"got {m.dtype} {tuple(m.shape)}"
                )

    # -- queries ------------------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return len(self.rescalers)

    @property
    def n_params(self) -> int:
        """Number of merged (float) parameters: the entries each mask covers."""
        return sum(v.numel() for v in self.shared.values())

    def _check_task(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t < self.n_tasks):
            raise IndexError(f"{self.method}: task index t={t!r} must be an int in [0, {self.n_tasks})")
        return t

    def mask(self, t: int) -> dict[str, Tensor]:
        """Task ``t``'s bool mask per float key (views, no copy)."""
        t = self._check_task(t)
        return {key: m[t] for key, m in self.masks.items()}

    def task_weights(self, t: int) -> dict[str, Tensor]:
        """``theta_0 + l_t * (m_t * v)`` (fp32 arithmetic) in the pretrained dtypes, pretrained key order.

        Non-floating keys are copied from ``pretrained``.  One key at a time: the only large
        allocation is the returned state dict.
        """
        t = self._check_task(t)
        lam = self.rescalers[t]
        out: dict[str, Tensor] = {}
        for key in self.keys:
            pre = self.pretrained[key]
            if key not in self.shared:
                out[key] = pre.clone()
                continue
            upd = torch.mul(self.shared[key], self.masks[key][t])
            if lam != 1.0:
                upd.mul_(lam)
            upd.add_(pre)
            out[key] = upd if pre.dtype == torch.float32 else upd.to(pre.dtype)
        return out

    def bits_per_parameter(self, t: int) -> float:
        """Bits task ``t`` costs to store beyond the shared vector, per merged parameter.

        ``(n_params * 1 + rescaler_bits) / n_params``: one bit per masked entry (packed) plus its
        rescaler (32 bits for EMR, 0 for TALL masks) amortised over the ``n_params`` entries.
        """
        self._check_task(t)
        n = self.n_params
        return (n + self.rescaler_bits) / n if n else math.nan

    def task_bits(self, t: int) -> int:
        """Bits task ``t`` costs to store beyond the shared vector (mask + rescaler)."""
        self._check_task(t)
        return self.n_params + self.rescaler_bits

    def total_storage_bits(self, include_pretrained: bool = True) -> int:
        """Bits to store everything needed to serve all tasks.

        Shared vector (32 bits per parameter, as held) + every task's mask and rescaler
        (:meth:`task_bits`) + with ``include_pretrained`` the pretrained checkpoint at its own dtypes.
        """
        bits = 32 * self.n_params + sum(self.task_bits(t) for t in range(self.n_tasks))
        if include_pretrained:
            for key in self.keys:
                if isinstance(self.pretrained, LazyStateDict):
                    numel = self.pretrained.numel(key)
                else:
                    numel = self.pretrained[key].numel()
                bits += numel * _bits(_dtype(self.pretrained, key))
        return bits

    def storage_summary(self) -> dict[str, float | list[float] | int]:
        """Numbers for a report: bits/parameter per task, shared and total (with pretrained)."""
        n = self.n_params
        return {
            "method": self.method,
            "n_tasks": self.n_tasks,
            "n_params": n,
            "task_bits_per_parameter": [self.bits_per_parameter(t) for t in range(self.n_tasks)],
            "shared_bits_per_parameter": 32.0,
            "total_bits": self.total_storage_bits(),
            "total_bits_without_pretrained": self.total_storage_bits(include_pretrained=False),
        }
