"""The scaling-coefficient search: accuracy of theta_0 + c * tau_m for every c of a grid, each batch read once.

Every merging method with a `scaling_coef` gives theta(c) = theta_0 + c * tau_m with tau_m independent of c
(tests/test_search.py checks this for each one; a method that is not must say `affine_in_scaling_coef = False`
and is searched by merging at each c). So the search merges once (c = 1), keeps theta_0 and tau_m, and for
each batch of each val split, decoded once:
- plain encoders: writes theta(c) into ONE evaluation encoder in place and runs it, for every c;
- linearized encoders (finetune=linear, method=partial_linearization): f_lin(x; theta_0 + c tau_m) is
  f(x; theta_0) + c J tau_m, so one jvp per batch gives the features at every c, exactly.
Under trainer=ddp the whole grid runs in one start of the ranks (fusion_bench.evaluation.distributed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import cache

import torch
from torch import nn
from torch.utils.data import Dataset

from fusion_bench.evaluation.accuracy import predictions
from fusion_bench.models.heads import head_logits
from fusion_bench.models.linearize import LinearizedModel

log = logging.getLogger(__name__)
GRID = [round(0.05 * i, 2) for i in range(21)]


def normalized_mean(acc: Mapping[str, float], ref: Mapping[str, dict], split: str) -> float:
    """Mean over tasks of accuracy / the task's own fine-tuned accuracy on the same split. A task whose fine-tune
    scores 0 (or less: a Matthews correlation) there has no normalized accuracy: it is left out with a warning
    (dividing by ~0 made it outweigh every other task by 1e12 and decide the coefficient alone); with no task
    left, the plain mean accuracy."""
    ft = {t: ref[t][f"finetuned_{split}"] for t in acc}
    defined = [t for t in acc if ft[t] > 0]
    if not defined:  # tiny fine-tunes, a Matthews correlation of 0: the plain mean still ranks the merges
        _warn_left_out(split, tuple(sorted(acc)), "the plain mean accuracy is used")
        return sum(acc.values()) / len(acc)
    if len(defined) < len(acc):
        _warn_left_out(split, tuple(sorted(set(acc) - set(defined))))
    return sum(acc[t] / ft[t] for t in defined) / len(defined)


@cache  # once per run, not at every grid point
def _warn_left_out(split: str, tasks: tuple[str, ...], then: str = "") -> None:
    log.warning("normalized accuracy on %s leaves out %s: the fine-tune scores 0 (or less) there%s", split,
                list(tasks), f"; {then}" if then else "")


def affine_in_coef(method) -> bool:
    return getattr(getattr(method, "func", method), "affine_in_scaling_coef", True)


class CoefficientGrid(nn.Module):
    """One evaluation encoder and the merge line theta_0 + c * tau_m; `logits(x, head)` gives the logits of every
    c of the grid for one batch. `load(weights)` writes merge-space weights into the encoder in place."""

    def __init__(self, encoder: nn.Module, pretrained: Mapping[str, torch.Tensor],
                 merged_at_one: Mapping[str, torch.Tensor], grid: Sequence[float],
                 load: Callable[[nn.Module, Mapping[str, torch.Tensor]], object]):
        super().__init__()
        self.encoder, self.grid, self._load = encoder, [float(c) for c in grid], load
        self.names = [k for k, v in pretrained.items() if v.is_floating_point()]
        self.index = {k: i for i, k in enumerate(self.names)}  # name -> buffer number, for theta(c) by name
        # a dict merge is consumed key by key (tau_m takes the merge's memory, not more); a mapping is only read
        take = merged_at_one.pop if isinstance(merged_at_one, dict) else merged_at_one.__getitem__
        for i, k in enumerate(self.names):  # buffers: they follow the module to its device (and DDP ranks)
            self.register_buffer(f"theta0_{i}", pretrained[k].float(), persistent=False)
            self.register_buffer(f"tau_{i}", _minus(take(k), pretrained[k], isinstance(merged_at_one, dict)), persistent=False)
        self.jvp = isinstance(encoder, LinearizedModel)
        if self.jvp:  # the linearized encoder at c = 1: its jvp tangent is then J tau_m
            self._load(self.encoder, self.weights(1.0))

    def weights(self, c: float) -> Mapping[str, torch.Tensor]:
        """theta(c), each weight computed when it is read: writing it into the evaluation encoder holds one
        temporary tensor, not a whole copy of the weights (about one encoder less at a ViT-L/14 search's peak)."""
        return _Line(self, c)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, head: torch.Tensor) -> list[torch.Tensor]:
        if self.jvp:
            f0, df = self.encoder.primal_and_tangent(x)
            return [head_logits(f0 + c * df, head) for c in self.grid]
        out = []
        for c in self.grid:
            self._load(self.encoder, self.weights(c))
            out.append(head_logits(self.encoder(x), head))
        return out


class _Line(Mapping[str, torch.Tensor]):
    """theta_0 + c * tau_m of a CoefficientGrid as a read-only mapping, computed key by key."""

    def __init__(self, grid: CoefficientGrid, c: float):
        self.grid, self.c = grid, c

    def __getitem__(self, k: str) -> torch.Tensor:
        i = self.grid.index[k]
        return getattr(self.grid, f"theta0_{i}") + self.c * getattr(self.grid, f"tau_{i}")

    def __iter__(self):
        return iter(self.grid.names)

    def __len__(self) -> int:
        return len(self.grid.names)


def _minus(merged: torch.Tensor, pretrained: torch.Tensor, owned: bool) -> torch.Tensor:
    """merged - pretrained in fp32; in the merged tensor's own memory when it was handed over (`owned`), is fp32
    and is not theta_0 itself (a method may return theta_0's tensor for a key it leaves alone)."""
    if owned and merged.dtype == torch.float32 and merged.untyped_storage().data_ptr() != \
            pretrained.untyped_storage().data_ptr():
        return merged.sub_(pretrained.float())
    return merged.float() - pretrained.float()


class GridClassifier(nn.Module):
    """A classifier whose logits hold every coefficient of the grid: [batch, len(grid), classes]."""

    def __init__(self, grid: CoefficientGrid, head: torch.Tensor):
        super().__init__()
        self.grid = grid
        self.register_buffer("head", head.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.grid.logits(x, self.head), dim=1)


def grid_correct(grid: CoefficientGrid, head: torch.Tensor, dataset: Dataset, batch_size: int,
                 **where) -> list[float]:
    """Accuracy on `dataset` of the merge at every c of the grid, each batch read and decoded once (`where`:
    device, autocast, num_workers, as for accuracy.predictions)."""
    pred, y = predictions(GridClassifier(grid, head), dataset, batch_size, **where)  # pred: [n, len(grid)]
    return (pred == torch.as_tensor(y)[:, None]).double().mean(dim=0).tolist()
