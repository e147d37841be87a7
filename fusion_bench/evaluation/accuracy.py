"""Top-1 (micro) accuracy of a classifier on a data set, on the trainer's device and precision."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader, Dataset


def wants_gpu(trainer_cfg: DictConfig) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def eval_device(trainer_cfg: DictConfig) -> tuple[torch.device, torch.dtype | None]:
    """Where single-process evaluation runs and its autocast dtype: the trainer's accelerator and precision
    (trainer=gpu: cuda in bf16 autocast; trainer=cpu: the CPU in fp32)."""
    if wants_gpu(trainer_cfg) and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.accelerator={trainer_cfg.get('accelerator')} but torch sees no CUDA GPU "
                           f"(torch {torch.__version__}); use trainer=cpu")
    precision = str(trainer_cfg.get("precision", "32"))
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    return torch.device("cuda" if wants_gpu(trainer_cfg) else "cpu"), dtype


@contextmanager
def eval_mode(model: nn.Module):
    """model.eval() for the block, then every submodule's train/eval mode as it was (model.train(was) would set
    all of them to the top module's mode: a classifier built around a shared encoder would leave it training)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


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
