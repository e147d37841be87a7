"""The fine-tuning modes standard / lora / l_lora on a `T5Logits`, with the interface of fusion_bench.models.modes
(build_mode_model, to_merge_space, eval_model; trainable_state is shared).

`standard` is modes.build_mode_model itself. The LoRA modes use fusion_bench.models.lora (LoRAEncoder,
LinearizedLoRA, merged_weights: peft creates and names the adapters, the forward is W0 + (alpha/r) B A through
functional_call) but inject the adapters here: `lora.add_lora` only accepts targets that are
nn.MultiheadAttention (open_clip), while T5's attention projections q, v are nn.Linear.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from peft import inject_adapter_in_model
from torch import nn

from fusion_bench.models import modes
from fusion_bench.models.lora import (
    ADAPTER,
    LinearizedLoRA,
    LoRAEncoder,
    adapted_weights,
    lora_config,
    merged_weights,
    plain_name,
)
from fusion_bench.models.modes import load_trainable, trainable_state

__all__ = ["MODES", "add_lora", "build_mode_model", "eval_model", "to_merge_space", "trainable_state"]

MODES = ("standard", "lora", "l_lora")


def _check(cfg: DictConfig) -> str:
    if cfg.mode not in MODES:
        raise ValueError(f"finetune={cfg.mode} is not available for T5; use one of {MODES}")
    if cfg.mode == "lora" and cfg.get("task_vector", "delta_w") not in ("delta_w", "adapters"):
        raise ValueError(f"finetune.task_vector={cfg.task_vector!r}: expected delta_w or adapters")
    return cfg.mode


def add_lora(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """peft LoRA adapters on the Linear layers matched by cfg.target_modules, in place; only adapters train.
    Deterministic in cfg.init_seed (every task starts from the same phi_0); `init: compensated` offsets each
    base weight by -(alpha/r) B0 A0 so the model at phi_0 is the pretrained one (see fusion_bench/models/lora.py)."""
    config = lora_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    layers = adapted_weights(model)
    if not layers:
        raise ValueError(f"finetune.target_modules={config.target_modules!r} matched no Linear of "
                         f"{type(model).__name__}; T5 attention projections are '...SelfAttention.q' etc.")
    if cfg.get("init", "zero_b") == "compensated":
        with torch.no_grad():
            phi0 = {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}
            folded = merged_weights(model, phi0)  # W + s B0 A0
            for name in layers:
                base = model.get_parameter(name)
                base.sub_((folded[plain_name(name)] - base).to(base.dtype))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return model


def build_mode_model(cfg: DictConfig, backbone: nn.Module) -> nn.Module:
    """A fresh trainable copy of the backbone for the mode (trainable = requires_grad)."""
    mode = _check(cfg)
    if mode == "standard":
        return modes.build_mode_model(cfg, backbone)
    module = add_lora(copy.deepcopy(backbone).train(), cfg)
    return (LoRAEncoder(module) if mode == "lora" else LinearizedLoRA(module)).train()


def pretrained_trainable(cfg: DictConfig, backbone: nn.Module) -> dict[str, torch.Tensor] | None:
    """Views of the backbone's parameters for finetune=standard (see fusion_bench.models.modes); None for LoRA."""
    return modes.pretrained_trainable(cfg, backbone) if _check(cfg) == "standard" else None


def _delta_w(cfg: DictConfig) -> bool:
    return cfg.mode == "lora" and cfg.get("task_vector", "delta_w") == "delta_w"


def to_merge_space(cfg: DictConfig, backbone: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Identity, except lora with task_vector=delta_w: {q / v weight name: W0 + (alpha/r) B A}."""
    _check(cfg)
    return merged_weights(build_mode_model(cfg, backbone), state) if _delta_w(cfg) else state


def _with_weights(backbone: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    module = copy.deepcopy(backbone)
    params = dict(module.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"{type(backbone).__name__} has no parameters {unknown[:5]}")
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(v.to(params[n].dtype))
    return module


def eval_model(cfg: DictConfig, backbone: nn.Module, merged: dict[str, torch.Tensor],
               linearized: bool = False) -> nn.Module:
    """A model at the given merge-space weights: a plain T5Logits (standard; LoRA folded into W), or for
    `linearized` (method=partial_linearization, l_lora only) the linearized LoRA model."""
    mode = _check(cfg)
    if linearized and mode != "l_lora":
        raise ValueError(f"finetune={mode} cannot be evaluated linearized; the method needs finetune=l_lora")
    if mode == "standard" or _delta_w(cfg):
        module = _with_weights(backbone, merged)
    elif mode == "l_lora" and not linearized:
        module = _with_weights(backbone, merged_weights(build_mode_model(cfg, backbone), merged))
    else:  # lora with adapter task vectors, or linearized l_lora
        module = load_trainable(build_mode_model(cfg, backbone), merged)
    return module.requires_grad_(False).eval()
