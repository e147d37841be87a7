"""Fine-tuning modes: which parameters of the image encoder train, and in which space task vectors live.

A mode turns a pretrained encoder into a trainable module. The store keeps exactly the module's trainable
parameters (by name), task vectors are differences of those (after `to_merge_space`), and a merged set of them
is turned back into an encoder by `eval_model`.

| mode            | trains (store keys)                                   | merge space                | evaluated as |
|-----------------|-------------------------------------------------------|----------------------------|--------------|
| standard        | every encoder parameter                               | = stored                   | plain encoder |
| linear          | every parameter theta of f(x;th0) + J (theta - th0)   | = stored (encoder names)   | linearized encoder |
| linear, posthoc | every encoder parameter, trained as `standard`        | = stored                   | linearized encoder |
| attention       | per block attn.in_proj_weight, attn.out_proj.weight   | = stored                   | plain encoder |
|                 | (+ in_proj_bias, out_proj.bias with train_bias)       |                            |              |
| linear_layers   | + mlp.c_fc.weight, mlp.c_proj.weight (+ biases)       | = stored                   | plain encoder |
| lora            | peft adapters A, B on every block's attention         | delta_w: the adapted full  | plain encoder |
|                 |                                                       | weights W0 + s B A (plain  |              |
|                 |                                                       | names, attention keys)     |              |
|                 |                                                       | adapters: = stored         | LoRA model   |
| l_lora          | adapters of the LoRA forward linearized in phi        | = stored (adapters)        | full weights W0 + s B A (default); linearized adapters with `linearized=True` |

Modules are always fresh copies; the encoder passed in is never modified. LoRA models keep peft's parameter
names (`...attn.lora_A.default.weight`, `...attn.base_layer.out_proj.lora_B.default.weight`) but run their own
forward: see fusion_bench/models/lora.py for why (a peft 0.21 bug among other things).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusion_bench.keys import without_off_options
from fusion_bench.models.linearize import LinearizedModel
from fusion_bench.models.lora import LinearizedLoRA, LoRAEncoder, add_lora, merged_weights

MODES = ("standard", "linear", "attention", "linear_layers", "lora", "l_lora")
BLOCK = re.compile(r"(^|\.)resblocks\.\d+$")


# ---- parameter selection ------------------------------------------------------------------------------------
def _is_attention(m: nn.Module) -> bool:
    """nn.MultiheadAttention or any attention holding a fused `in_proj_weight` and an `out_proj` Linear."""
    return isinstance(getattr(m, "in_proj_weight", None), nn.Parameter) and isinstance(
        getattr(m, "out_proj", None), nn.Linear)


def block_weight_names(encoder: nn.Module, mlp: bool, bias: bool) -> list[str]:
    """Parameter names inside the transformer blocks: attention in/out projections, and with `mlp` every other
    Linear of the block (open_clip: mlp.c_fc, mlp.c_proj). Weights always, biases with `bias`."""
    blocks = [(n, m) for n, m in encoder.named_modules() if BLOCK.search(n)]
    if not blocks:
        raise ValueError(f"{type(encoder).__name__} has no transformer blocks named '...resblocks.<i>': "
                         "finetune=attention / linear_layers need an open_clip ViT")
    names: list[str] = []
    for bname, block in blocks:
        attention = [mname for mname, m in block.named_modules() if _is_attention(m)]
        for mname, m in block.named_modules():
            prefix = f"{bname}.{mname}" if mname else bname
            if mname in attention:
                names += [f"{prefix}.in_proj_weight", f"{prefix}.out_proj.weight"]
                if bias and m.in_proj_bias is not None:
                    names.append(f"{prefix}.in_proj_bias")
                if bias and m.out_proj.bias is not None:
                    names.append(f"{prefix}.out_proj.bias")
            elif mlp and isinstance(m, nn.Linear) and not any(mname.startswith(a + ".") for a in attention):
                names.append(f"{prefix}.weight")
                if bias and m.bias is not None:
                    names.append(f"{prefix}.bias")
    return names


def _train_only(module: nn.Module, names: list[str]) -> nn.Module:
    params = dict(module.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"parameters to train not found in {type(module).__name__}: {missing[:5]}")
    module.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    return module


def _check_mode(cfg: DictConfig) -> str:
    mode = cfg.mode
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode finetune.mode={mode!r}; expected one of {MODES}")
    if mode == "lora" and cfg.get("task_vector", "delta_w") not in ("delta_w", "adapters"):
        raise ValueError(f"finetune.task_vector={cfg.task_vector!r}: expected delta_w or adapters")
    return mode


def _lora_delta_w(cfg: DictConfig) -> bool:
    return cfg.mode == "lora" and cfg.get("task_vector", "delta_w") == "delta_w"


# ---- the interface the pipeline uses ------------------------------------------------------------------------
EVALUATION_ONLY = ("posthoc", "task_vector")  # options that change how a fine-tune is used, not how it trains


def training_config(finetune_cfg: DictConfig) -> dict:
    """The part of finetune.* that decides the trained weights (the checkpoint store's key): a post-hoc
    linearized fine-tune *is* a standard one, and LoRA's task_vector option only changes the merge space."""
    if finetune_cfg.mode == "linear" and finetune_cfg.get("posthoc", False):
        return {"mode": "standard", **({"train_head": True} if finetune_cfg.get("train_head") else {})}
    options = without_off_options(OmegaConf.to_container(finetune_cfg, resolve=True))
    return {k: v for k, v in options.items() if k not in EVALUATION_ONLY}


def build_mode_model(finetune_cfg: DictConfig, encoder: nn.Module) -> nn.Module:
    """A fresh trainable copy of `encoder` for the mode named by finetune.mode (trainable = requires_grad)."""
    mode = _check_mode(finetune_cfg)
    module = copy.deepcopy(encoder).train()
    if mode == "standard" or (mode == "linear" and finetune_cfg.get("posthoc", False)):
        return module.requires_grad_(True)
    if mode == "linear":
        return LinearizedModel(module.requires_grad_(True)).train()
    if mode in ("attention", "linear_layers"):
        names = block_weight_names(module, mlp=mode == "linear_layers", bias=bool(finetune_cfg.get("train_bias")))
        return _train_only(module, names)
    if mode == "lora":
        return LoRAEncoder(add_lora(module, finetune_cfg)).train()
    return LinearizedLoRA(add_lora(module, finetune_cfg)).train()  # l_lora


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What the store keeps and what task vectors are over: the trainable parameters, detached, in fp32 (views of
    fp32 parameters, not copies: an encoder-sized copy per call is what made real-size runs run out of memory)."""
    return {n: p.detach().float() for n, p in module.named_parameters() if p.requires_grad}


def pretrained_trainable(finetune_cfg: DictConfig, encoder: nn.Module) -> dict[str, torch.Tensor] | None:
    """trainable_state(build_mode_model(cfg, encoder)) without building it, as views of `encoder`'s own
    parameters, for the modes that train a subset of them as they are (standard, post-hoc linear, attention,
    linear_layers); None for the others (they add or wrap parameters)."""
    mode = _check_mode(finetune_cfg)
    params = dict(encoder.named_parameters())
    if mode == "standard" or (mode == "linear" and finetune_cfg.get("posthoc", False)):
        names = list(params)
    elif mode in ("attention", "linear_layers"):
        names = block_weight_names(encoder, mlp=mode == "linear_layers", bias=bool(finetune_cfg.get("train_bias")))
    else:
        return None
    return {n: params[n].detach().float() for n in names}


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a (merged) trainable state into a mode module; every trainable parameter must be given."""
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise KeyError(f"state does not match the mode's trainable parameters: missing "
                       f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    return _copy_into(module, state)


def _copy_into(module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        params = dict(module.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"{type(module).__name__} has no parameters {unknown[:5]}")
        for n, v in state.items():
            params[n].copy_(v.to(params[n].dtype))
    return module


def to_merge_space(finetune_cfg: DictConfig, encoder: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The space task vectors live in, from a stored trainable state.

    Identity except `lora` with `task_vector: delta_w`, where the adapters are folded into the full weights they
    adapt: {plain encoder name: W_0 + (alpha / r) B @ A} (the attention in_proj_weight / out_proj.weight of every
    block, i.e. the keys `finetune=attention` trains), exactly what peft's merge_and_unload produces.
    """
    _check_mode(finetune_cfg)
    if _lora_delta_w(finetune_cfg):
        return merged_weights(build_mode_model(finetune_cfg, encoder), state)
    return state


def eval_model(finetune_cfg: DictConfig, encoder: nn.Module, merged: dict[str, torch.Tensor],
               linearized: bool = False) -> nn.Module:
    """An encoder to evaluate with the given merge-space weights (a fine-tune, the pretrained point or a merge).

    `linearized=True` is asked for by methods that evaluate through the linearized model
    (method=partial_linearization): for l_lora the adapters are evaluated through the linearized LoRA forward.
    """
    mode = _check_mode(finetune_cfg)
    if linearized and mode not in ("l_lora", "linear"):
        raise ValueError(f"finetune={mode} cannot be evaluated linearized (method needs linearized fine-tunes); "
                         "use finetune=l_lora")
    if mode == "linear":  # trained linearized or (posthoc) trained normally: evaluated linearized either way
        plain = copy.deepcopy(encoder).requires_grad_(True)
        module = load_trainable(LinearizedModel(plain), merged)
    elif mode == "l_lora" and not linearized:
        module = _copy_into(copy.deepcopy(encoder), merged_weights(build_mode_model(finetune_cfg, encoder), merged))
    elif _lora_delta_w(finetune_cfg):
        module = _copy_into(copy.deepcopy(encoder), merged)
    else:
        module = load_trainable(build_mode_model(finetune_cfg, encoder), merged)
    return module.requires_grad_(False).eval()


def reload(module: nn.Module, merged: Mapping[str, torch.Tensor], *, finetune_cfg: DictConfig, base: nn.Module,
           linearized: bool = False) -> nn.Module:
    """Overwrite, in place, the weights of a module made by `eval_model` with other merge-space weights (one
    evaluation encoder for a whole coefficient search, instead of a fresh copy per coefficient). `base` is the
    mode model at the pretrained weights (`build_mode_model`), which l_lora needs to fold adapters."""
    if finetune_cfg.mode == "l_lora" and not linearized:
        merged = merged_weights(base, merged)
    return _copy_into(module, merged)


POSTHOC_MODES = ("standard", "attention", "linear_layers", "lora")


def check_posthoc_mode(finetune_cfg: DictConfig) -> str:
    mode = _check_mode(finetune_cfg)
    if mode not in POSTHOC_MODES or finetune_cfg.get("posthoc", False):
        raise ValueError(f"finetune={mode} is evaluated linearized already (f = f_lin): post-hoc linearization "
                         f"compares a non-linear fine-tune with its linearization; use finetune= one of {POSTHOC_MODES}")
    return mode


def posthoc_linearized(finetune_cfg: DictConfig, encoder: nn.Module) -> LinearizedModel:
    """The mode model linearized around theta_0 in exactly the parameters the mode trains (analysis=kernel):
    f(x; theta_0) + J (theta - theta_0) with theta the store's keys (the encoder's weights for standard,
    attention and linear_layers; LoRA's adapters for lora, linearized around their shared init phi_0). Load a
    stored fine-tune into it with `load_trainable`; at theta_0 it is the plain encoder."""
    mode = check_posthoc_mode(finetune_cfg)
    if mode == "lora":
        return LinearizedLoRA(add_lora(copy.deepcopy(encoder), finetune_cfg)).train()
    return LinearizedModel(build_mode_model(finetune_cfg, encoder)).train()
