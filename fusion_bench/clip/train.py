"""CLIP's fine-tuning: the LightningModule that trains an image encoder behind a frozen zero-shot head, and
`finetune`, one task's resumable fit (fusion_bench/finetune/train.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CUDAAccelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from fusion_bench.clip.model import ImageClassifier
from fusion_bench.finetune.sampler import SeededAugmentation, StepBatchSampler, StepDataLoader
from fusion_bench.finetune.schedule import cosine_with_warmup

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
    from omegaconf import DictConfig

    from fusion_bench.data.tasks import Task


class ClassifierFinetune(L.LightningModule):
    def __init__(self, classifier: ImageClassifier, num_classes: int, lr: float, weight_decay: float,
                 warmup_steps: int, max_steps: int, train_set: Dataset | None = None, batch_size: int = 64,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.classifier = classifier
        self.train_set, self.batch_size, self.seed, self.num_workers = train_set, batch_size, seed, num_workers
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def train_dataloader(self) -> DataLoader:
        # every pass starts at the trainer's global step: where a resumed run continues (StepDataLoader)
        sampler = StepBatchSampler(len(self.train_set), self.batch_size, self.seed, self.max_steps,
                                   with_seeds=True)
        return StepDataLoader(SeededAugmentation(self.train_set), sampler, step=self._global_step,
                              num_workers=self.num_workers,
                              pin_memory=isinstance(self.trainer.accelerator, CUDAAccelerator),
                              persistent_workers=self.num_workers > 0)

    def _global_step(self) -> int:
        return self.trainer.global_step

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits.argmax(-1), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.classifier.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(self.warmup_steps, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def finetune(module: nn.Module, head: torch.Tensor, task: Task, train_cfg: DictConfig, trainer_cfg: DictConfig,
             seed: int, work_dir: Path, callbacks: list[Callback] = (), num_workers: int = 0) -> float:
    """Train `module` in place on the task's train split; returns seconds per step.

    work_dir keeps logs and `checkpoints/last.ckpt` (every train.checkpoint_every steps); a rerun after an
    interruption resumes from it and ends with the same weights as an uninterrupted run.
    """
    from fusion_bench.finetune.train import (
        fit_resumable,  # Hydra's instantiate: not needed by the module itself
    )

    L.seed_everything(seed, workers=True, verbose=False)
    lm = ClassifierFinetune(ImageClassifier(module, head), task.num_classes, lr=train_cfg.lr,
                            weight_decay=train_cfg.weight_decay, warmup_steps=train_cfg.warmup_steps,
                            max_steps=train_cfg.steps, train_set=task.split("train"),
                            batch_size=train_cfg.batch_size, seed=seed, num_workers=num_workers)
    return fit_resumable(lm, train_cfg, trainer_cfg, work_dir, callbacks)
