"""A merged T5 as a transformers `save_pretrained` folder (with its tokenizer), or merged LoRA adapters as a peft
adapter folder (adapter_config.json + adapter_model.safetensors) for `PeftModel.from_pretrained`.

The adapter folder targets the unmodified pretrained T5. Adapters trained from `finetune.init=compensated` run on
a base offset by -(alpha/r) B0 A0 (fusion_bench.models.lora), so their folder holds the rank-2r adapter
B' = [B, -B0], A' = [A; A0] with alpha' = 2 alpha (the same scaling alpha / r): W0 + (alpha/r) B' A' is exactly
(W0 - (alpha/r) B0 A0) + (alpha/r) B A, the merged model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from fusion_bench.export.files import new_dir


def write_t5(t5: nn.Module, tokenizer, out: str | Path) -> Path:
    """`t5.save_pretrained` and `tokenizer.save_pretrained` into the folder `out`, which must not exist."""

    def write(tmp: Path) -> None:
        t5.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return new_dir(out, write)


def peft_adapters(finetune_cfg: DictConfig, merged: Mapping[str, torch.Tensor], phi0: Mapping[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], int, float]:
    """(adapters by fusion_bench name, r, alpha) of a peft LoRA on the unmodified base giving the merged model."""
    r, alpha = int(finetune_cfg.get("r", 16)), float(finetune_cfg.get("alpha", 32))
    phi = {k: v.detach().float() for k, v in merged.items()}
    if finetune_cfg.get("init", "zero_b") != "compensated":
        return phi, r, alpha
    out = {}
    for k, v in phi.items():
        if ".lora_A." in k:
            out[k] = torch.cat([v, phi0[k].float()], dim=0)
        elif ".lora_B." in k:
            out[k] = torch.cat([v, -phi0[k].float()], dim=1)
        else:
            raise KeyError(f"{k} is no LoRA adapter (lora_A / lora_B)")
    return out, 2 * r, 2 * alpha


def write_peft_adapter(t5: nn.Module, finetune_cfg: DictConfig, merged: Mapping[str, torch.Tensor],
                       phi0: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """The merged adapters as peft's `save_pretrained` folder at `out` (which must not exist), for the pretrained
    `t5`; `phi0` are the adapters' initial values (needed for finetune.init=compensated)."""
    from peft import LoraConfig, get_peft_model

    phi, r, alpha = peft_adapters(finetune_cfg, merged, phi0)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="SEQ_2_SEQ_LM",
                        target_modules=str(finetune_cfg.target_modules))
    model = get_peft_model(copy.deepcopy(t5), config)
    params = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if ".lora_" in n}
    if set(params) != set(phi):
        raise KeyError(f"the merged adapters do not match peft's LoRA on {finetune_cfg.target_modules!r}: missing "
                       f"{sorted(set(params) - set(phi))[:5]}, unexpected {sorted(set(phi) - set(params))[:5]}")
    with torch.no_grad():
        for name, value in phi.items():
            params[name].copy_(value.to(params[name].dtype))
    return new_dir(out, model.save_pretrained)
