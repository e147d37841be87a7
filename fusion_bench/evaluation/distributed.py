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
    def __init__(self, classifier: nn.Module, num_classes: int):
        super().__init__()
        self.classifier = classifier
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.acc.update(self.classifier(x).argmax(-1), y)

    def on_test_epoch_end(self):
        self.log("acc", self.acc.compute(), sync_dist=False)  # torchmetrics already summed over ranks


def distributed_accuracy(classifier: nn.Module, dataset: Dataset, num_classes: int, batch_size: int,
                         trainer_cfg: DictConfig, num_workers: int = 0) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, sampler=UnrepeatedDistributedSampler(dataset),
                        num_workers=num_workers)
    trainer: L.Trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False,
                                     enable_progress_bar=False, enable_model_summary=False,
                                     use_distributed_sampler=False)
    (result,) = trainer.test(_Evaluate(classifier, num_classes), dataloaders=loader, verbose=False)
    return float(result["acc"])
