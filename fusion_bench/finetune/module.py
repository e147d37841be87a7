"""LightningModule that fine-tunes an image encoder behind a frozen zero-shot head."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from fusion_bench.finetune.sampler import SeededAugmentation, StepBatchSampler, StepDataLoader
from fusion_bench.models.clip import ImageClassifier


def cosine_with_warmup(warmup_steps: int, max_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


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
