"""Top-1 (micro) accuracy of a classifier on a data set."""

from __future__ import annotations

import torch
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int = 256) -> float:
    """Fraction of correctly classified samples; every sample counted exactly once."""
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro")
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in track(loader, description="evaluating", transient=True, disable=len(dataset) < 5000):
        metric.update(model(x).argmax(dim=-1), y)
    model.train(was_training)
    return float(metric.compute())
