"""Accuracy under Lightning DDP that counts every test sample exactly once.

Lightning's default DistributedSampler pads the last batch with repeated samples so every rank gets the same
count; that silently changes accuracy. Here each rank takes indices rank, rank + world, ... and torchmetrics sums
the per-rank counts.
"""

from __future__ import annotations

import lightning as L
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics.classification import MulticlassAccuracy


class UnrepeatedDistributedSampler(Sampler[int]):
    """Every index exactly once across ranks (ranks may get one sample more or less)."""

    def __init__(self, dataset: Dataset):
        self.n = len(dataset)

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


class _Evaluate(L.LightningModule):
    """Accuracy of one or more classifiers, the i-th on the i-th test dataloader."""

    def __init__(self, classifiers: list[nn.Module], num_classes: list[int]):
        super().__init__()
        self.classifiers = nn.ModuleList(classifiers)  # shared submodules (one encoder, many heads) are kept once
        self.accs = nn.ModuleList(MulticlassAccuracy(num_classes=n, average="micro") for n in num_classes)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.accs[dataloader_idx].update(self.classifiers[dataloader_idx](x).argmax(-1), y)

    def on_test_epoch_end(self):
        for i, acc in enumerate(self.accs):  # torchmetrics sums the per-rank counts itself
            self.log(f"acc/{i}", acc.compute(), sync_dist=False, add_dataloader_idx=False)


def distributed_accuracies(classifiers: list[nn.Module], datasets: list[Dataset], num_classes: list[int],
                           batch_size: int, trainer_cfg: DictConfig, num_workers: int = 0) -> list[float]:
    """Accuracy of classifiers[i] on datasets[i], all in ONE start of the trainer's ranks (ddp_spawn starts them
    per call, which costs seconds), every sample counted exactly once."""
    trainer = _test(_Evaluate(classifiers, num_classes), datasets, batch_size, trainer_cfg, num_workers)
    return [float(trainer.callback_metrics[f"acc/{i}"]) for i in range(len(classifiers))]


class _EvaluateGrid(L.LightningModule):
    """Accuracy of the merge at every coefficient of a CoefficientGrid on every test dataloader (one per task)."""

    def __init__(self, grid: nn.Module, heads: list, num_classes: list[int]):
        super().__init__()
        self.grid = grid
        for i, h in enumerate(heads):
            self.register_buffer(f"head_{i}", h.detach().clone(), persistent=False)
        self.accs = nn.ModuleList(nn.ModuleList(MulticlassAccuracy(num_classes=n, average="micro") for _ in grid.grid)
                                  for n in num_classes)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        for acc, logits in zip(self.accs[dataloader_idx], self.grid.logits(x, getattr(self, f"head_{dataloader_idx}"))):
            acc.update(logits.argmax(-1), y)

    def on_test_epoch_end(self):
        for i, accs in enumerate(self.accs):
            for j, acc in enumerate(accs):
                self.log(f"acc/{i}/{j}", acc.compute(), sync_dist=False, add_dataloader_idx=False)


def distributed_grid_accuracies(grid: nn.Module, heads: list, datasets: list[Dataset], num_classes: list[int],
                                batch_size: int, trainer_cfg: DictConfig, num_workers: int = 0) -> list[list[float]]:
    """acc[i][j]: accuracy on datasets[i] (with heads[i]) of the merge at grid.grid[j]: a whole coefficient search
    in ONE start of the ranks, each batch read once for every coefficient."""
    trainer = _test(_EvaluateGrid(grid, heads, num_classes), datasets, batch_size, trainer_cfg, num_workers)
    return [[float(trainer.callback_metrics[f"acc/{i}/{j}"]) for j in range(len(grid.grid))]
            for i in range(len(datasets))]


def _test(module: L.LightningModule, datasets: list[Dataset], batch_size: int, trainer_cfg: DictConfig,
          num_workers: int) -> L.Trainer:
    loaders = [DataLoader(d, batch_size=batch_size, sampler=UnrepeatedDistributedSampler(d), num_workers=num_workers)
               for d in datasets]
    trainer: L.Trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False,
                                     enable_progress_bar=False, enable_model_summary=False,
                                     use_distributed_sampler=False)
    trainer.test(module, dataloaders=loaders, verbose=False)
    return trainer


def distributed_accuracy(classifier: nn.Module, dataset: Dataset, num_classes: int, batch_size: int,
                         trainer_cfg: DictConfig, num_workers: int = 0) -> float:
    return distributed_accuracies([classifier], [dataset], [num_classes], batch_size, trainer_cfg, num_workers)[0]
