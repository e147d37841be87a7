"""Top-1 (micro) accuracy of a classifier on a data set, on the trainer's device and precision."""

from __future__ import annotations

import torch
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusion_bench.devices import eval_device, eval_mode, wants_gpu  # noqa: F401 -- their old home


@torch.no_grad()
def predictions(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu",
                autocast: torch.dtype | None = None, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax predictions, labels) over the whole data set, in order. The model is moved to `device` for the
    pass and back afterwards, in eval mode for the pass (see eval_mode)."""
    device = torch.device(device)
    home = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    preds, labels = [], []
    try:
        with eval_mode(model.to(device)):
            for x, y in track(loader, description="evaluating", transient=True, disable=len(dataset) < 5000):
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    preds.append(model(x.to(device, non_blocking=True)).argmax(dim=-1).cpu())
                labels.append(torch.as_tensor(y))
    finally:
        model.to(home)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int = 256, **where) -> float:
    """Fraction of correctly classified samples; every sample counted exactly once. `where`: see predictions."""
    pred, y = predictions(model, dataset, batch_size, **where)
    from torchmetrics.classification import MulticlassAccuracy  # 1.5 s to import: only where it counts

    return float(MulticlassAccuracy(num_classes=num_classes, average="micro")(pred, y))
