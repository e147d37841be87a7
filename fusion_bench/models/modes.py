"""Fine-tuning modes: which parameters of the image encoder train, and in which space task vectors live.

A mode turns a pretrained encoder into a trainable module. The store keeps exactly the module's trainable
parameters (by name), task vectors are differences of those, and a merged set of them is loaded back into a
fresh module of the same mode for evaluation.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from torch import nn


def build_mode_model(finetune_cfg: DictConfig, encoder: nn.Module) -> nn.Module:
    """A fresh trainable copy of `encoder` for the mode named by finetune.mode."""
    mode = finetune_cfg.mode
    module = copy.deepcopy(encoder).train()
    if mode == "standard":
        module.requires_grad_(True)
        return module
    raise ValueError(f"unknown fine-tuning mode finetune.mode={mode!r}")


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What the store keeps and what task vectors are over: the trainable parameters, detached (fp32)."""
    return {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a (merged) trainable state into a mode module; every trainable parameter must be given."""
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise KeyError(f"state does not match the mode's trainable parameters: missing "
                       f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    with torch.no_grad():
        params = dict(module.named_parameters())
        for n, v in state.items():
            params[n].copy_(v.to(params[n].dtype))
    return module


def to_merge_space(finetune_cfg: DictConfig, encoder: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The space task vectors live in, from a stored trainable state. Identity unless the mode says otherwise."""
    return state


def eval_model(finetune_cfg: DictConfig, encoder: nn.Module, merged: dict[str, torch.Tensor],
               linearized: bool = False) -> nn.Module:
    """An encoder to evaluate with the given merge-space weights (a fine-tune, the pretrained point or a merge).

    `linearized=True` is asked for by methods that evaluate through the linearized model (partial_linearization).
    """
    if linearized:
        raise ValueError(f"finetune={finetune_cfg.mode} cannot be evaluated linearized; use finetune=l_lora")
    return load_trainable(build_mode_model(finetune_cfg, encoder), merged).eval()
