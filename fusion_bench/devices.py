"""Where and how a model runs: the device and autocast dtype of single-process evaluation, and eval mode that
restores every submodule's mode. Low helpers that evaluation, statistics and the model families share."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from torch import nn


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
