"""Seq2seq fine-tuning of a T5 mode model (standard / lora / l_lora) with a Lightning Trainer from `cfg.trainer`.

Same protocol as the CLIP fine-tunes (fusion_bench/finetune): AdamW over the trainable parameters, cosine schedule
with linear warmup stepped per optimizer step, batches drawn by `StepBatchSampler` (the batch of step s is a
function of (seed, s)), `last.ckpt` every `train.checkpoint_every` steps, and a rerun resumes from it to the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from fusion_bench.data.glue import Example
from fusion_bench.finetune.sampler import StepBatchSampler, StepDataLoader
from fusion_bench.finetune.schedule import cosine_with_warmup
from fusion_bench.finetune.train import fit_resumable
from fusion_bench.t5.model import decoder_inputs

log = logging.getLogger(__name__)


class Seq2SeqCollator:
    """Examples -> padded input_ids / attention_mask, labels (padding = -100) and teacher-forcing decoder inputs."""

    def __init__(self, tokenizer, max_source_length: int, max_target_length: int, start_id: int, pad_id: int):
        self.tokenizer, self.max_source_length, self.max_target_length = tokenizer, max_source_length, max_target_length
        self.start_id, self.pad_id = start_id, pad_id

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([e.source for e in batch], padding=True, truncation=True,
                             max_length=self.max_source_length, return_tensors="pt")
        tgt = self.tokenizer([e.target for e in batch], padding=True, truncation=True,
                             max_length=self.max_target_length, return_tensors="pt")
        labels = tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels,
                "decoder_input_ids": decoder_inputs(labels, self.start_id, self.pad_id)}


class Seq2SeqFinetune(L.LightningModule):
    def __init__(self, model: nn.Module, collate: Seq2SeqCollator, train_set: list[Example], lr: float,
                 weight_decay: float, warmup_steps: int, max_steps: int, batch_size: int, seed: int = 0):
        super().__init__()
        self.model, self.collate, self.train_set = model, collate, train_set
        self.lr, self.weight_decay, self.warmup_steps, self.max_steps = lr, weight_decay, warmup_steps, max_steps
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        # every pass starts at the trainer's global step: where a resumed run continues (StepDataLoader)
        sampler = StepBatchSampler(len(self.train_set), self.batch_size, self.seed, self.max_steps)
        return StepDataLoader(self.train_set, sampler, step=self._global_step, collate_fn=self.collate)

    def _global_step(self) -> int:
        return self.trainer.global_step

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            decoder_input_ids=batch["decoder_input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(self.warmup_steps, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def finetune_t5(model: nn.Module, collate: Seq2SeqCollator, train_set: list[Example], train_cfg: DictConfig,
                trainer_cfg: DictConfig, seed: int, work_dir: Path, callbacks: list[Callback] = ()) -> float:
    """Train `model` in place; returns seconds per step. work_dir keeps logs and checkpoints/last.ckpt."""
    L.seed_everything(seed, workers=True, verbose=False)
    lm = Seq2SeqFinetune(model, collate, train_set, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                         warmup_steps=train_cfg.warmup_steps, max_steps=train_cfg.steps,
                         batch_size=train_cfg.batch_size, seed=seed)
    return fit_resumable(lm, train_cfg, trainer_cfg, work_dir, callbacks)
