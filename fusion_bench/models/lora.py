"""LoRA on open_clip's attention with peft, its merge into full weights, and L-LoRA (linearized adapters).

peft (>= 0.15; checked against 0.21.2) wraps `nn.MultiheadAttention` in `peft.tuners.lora.layer.MultiheadAttention`,
which adapts both the fused qkv `in_proj_weight` and `out_proj.weight` (out_proj is wrapped in a LoRA `Linear`).
The target must be the MHA module itself (`...resblocks.<i>.attn`): targeting `out_proj` alone is silently
ignored because `nn.MultiheadAttention` never calls out_proj's forward. peft creates, names and initialises the
adapters here; the *forward* is ours, for three reasons found in peft/tuners/lora/layer.py (0.21.2):

* peft's MHA forward merges W + s B A into the weights, runs the plain MHA and unmerges, and its `merge()` adds
  the out_proj delta twice (W_out + 2 s B A, also in `merge_and_unload`; the unmerge subtracts it twice, so it
  goes unnoticed): huggingface/peft PR #3774. The extra delta is written through `.data`, so autograd does not
  even see it (value of W + 2 dW, gradient of W + dW).
* it mutates module attributes with `.data` on every call, which torch.func transforms (L-LoRA's jvp) refuse.
* there is no place for `lora_dropout` (it acts on a Linear's input; merged weights have no input term).

So `lora_function` disables the peft adapters and calls the plain encoder with the effective weights
W_base + (alpha / r) B @ A passed through `functional_call`: the LoRA model as defined, exactly what
`merged_weights` folds into the plain encoder. `finetune.dropout` must be 0 (a non-zero value is refused rather
than silently ignored). A LoRA `Linear` of peft is *not* an `nn.Linear` subclass: layers are found with
`isinstance(m, LoraLayer)`, never through an nn.Linear gate.

Initialisation (`finetune.init`, always under `torch.manual_seed(finetune.init_seed)` so that every task and the
pretrained point share phi_0 -- adapter task vectors phi_t - phi_0 are meaningless otherwise):

* `zero_b`: peft's default (A kaiming-uniform, B = 0): the model starts exactly at the pretrained encoder.
  Under linearization this gives A exactly zero gradient (J_A f = s B_0 (...) = 0), so in L-LoRA only B trains.
* `compensated` (default for l_lora): A and B both random (peft `init_lora_weights=False`: nn.Linear's
  kaiming-uniform for both), and the frozen base weight is offset by -s B_0 @ A_0, so the encoder at phi_0 is
  still exactly the pretrained one while both A and B receive gradient in the linearized model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from torch import nn

from fusion_bench.models.linearize import LinearizedModel, MountedModule

if TYPE_CHECKING:  # peft (and transformers under it) is imported where LoRA is used: 0.75 s of every start otherwise
    from peft import LoraConfig
    from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention

ADAPTER = "default"
DEFAULT_TARGET = r".*resblocks\.\d+\.attn"  # open_clip's nn.MultiheadAttention in every residual block
INITS = ("zero_b", "compensated")


def lora_config(cfg: DictConfig) -> LoraConfig:
    from peft import LoraConfig

    init = cfg.get("init", "zero_b")
    if init not in INITS:
        raise ValueError(f"finetune.init={init!r}: expected one of {INITS}")
    if float(cfg.get("dropout") or 0.0) != 0.0:
        raise ValueError(f"finetune.dropout={cfg.dropout}: LoRA on attention is applied as merged weights "
                         "W + (alpha/r) B A, where input dropout has no place (peft's MultiheadAttention ignores it "
                         "too); set finetune.dropout=0")
    return LoraConfig(
        r=int(cfg.get("r", 16)),
        lora_alpha=float(cfg.get("alpha", 32)),
        lora_dropout=0.0,
        target_modules=str(cfg.get("target_modules") or DEFAULT_TARGET),
        init_lora_weights=init == "zero_b",
        bias="none",
    )


def add_lora(encoder: nn.Module, cfg: DictConfig) -> nn.Module:
    """Inject LoRA adapters into `encoder` in place (only adapters trainable); deterministic in init_seed."""
    config = lora_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        from peft import inject_adapter_in_model

        model = inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
    if not adapted_weights(model):
        raise ValueError(f"finetune.target_modules={config.target_modules!r} matched no module of "
                         f"{type(encoder).__name__}; open_clip attention is '...resblocks.<i>.attn'")
    if cfg.get("init", "zero_b") == "compensated":
        with torch.no_grad():
            for name, layer in adapted_weights(model).items():
                base = model.get_parameter(name)
                base.sub_(_delta(layer, _adapter(model, layer, "A"), _adapter(model, layer, "B")).to(base.dtype))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraMultiheadAttention]:
    """The adapted attention modules (one per residual block for the default target), by name."""
    from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraMultiheadAttention)}


def adapted_weights(model: nn.Module) -> dict[str, tuple[str, float]]:
    """{peft name of each adapted base weight: (adapter prefix, scaling)} for every LoRA layer of the model."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer) or ADAPTER not in m.lora_A:
            continue
        if getattr(m, "fan_in_fan_out", False) or m.use_dora.get(ADAPTER, False):
            raise NotImplementedError(f"LoRA layer {name}: fan_in_fan_out / DoRA are not supported")
        if isinstance(m, LoraMultiheadAttention):
            weight = f"{name}.base_layer.in_proj_weight"
        elif isinstance(m.get_base_layer(), nn.Linear):
            weight = f"{name}.base_layer.weight"
        else:
            raise NotImplementedError(f"LoRA layer {name} wraps {type(m.get_base_layer()).__name__}; "
                                      "only nn.MultiheadAttention and nn.Linear are supported")
        out[weight] = (name, float(m.scaling[ADAPTER]))
    return out


def _adapter(params: nn.Module | Mapping[str, torch.Tensor], layer: tuple[str, float], which: str) -> torch.Tensor:
    key = f"{layer[0]}.lora_{which}.{ADAPTER}.weight"
    return params.get_parameter(key) if isinstance(params, nn.Module) else params[key]


def _delta(layer: tuple[str, float], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return layer[1] * (b @ a)


def effective_weights(model: nn.Module, phi: Mapping[str, torch.Tensor],
                      layers: Mapping[str, tuple[str, float]] | None = None) -> dict[str, torch.Tensor]:
    """{peft base-weight name: W_base + scaling * B @ A} with A, B taken from `phi` (differentiable in phi)."""
    layers = adapted_weights(model) if layers is None else layers
    return {name: model.get_parameter(name) + _delta(layer, _adapter(phi, layer, "A"), _adapter(phi, layer, "B"))
            for name, layer in layers.items()}


def plain_name(peft_name: str) -> str:
    """The name a weight has in the plain encoder: peft inserts `.base_layer` for every wrapped module."""
    return peft_name.replace(".base_layer", "")


@torch.no_grad()
def merged_weights(model: nn.Module, phi: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapters folded into full weights, under the plain encoder's names, in fp32 (fp64 for fp64 models)."""
    out = {}
    for name, layer in adapted_weights(model).items():
        w = model.get_parameter(name).detach()
        dtype = torch.promote_types(w.dtype, torch.float32)
        a, b = (_adapter(phi, layer, x).to(dtype) for x in "AB")
        out[plain_name(name)] = w.to(dtype) + _delta(layer, a, b)
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every peft layer runs its plain base layer (without touching requires_grad, unlike enable_adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m._disable_adapters = p


def settle_peft_weights(module: nn.Module) -> None:
    """peft's LoRA MultiheadAttention re-registers its base weights (`_restore_weights`) whenever its
    named_modules() runs, which functional_call does inside the call: under L-LoRA's jvp that leaves functorch-wrapped
    tensors registered afterwards, and a later `.to(device)` (Lightning's teardown, evaluation on a GPU) fails with
    "mutating directly with `.data` inside functorch transform". Walking the modules once after the call
    re-registers plain tensors of the same values."""
    for _ in module.modules():
        pass


def lora_function(wrapper: MountedModule, adapters: Mapping[str, torch.Tensor], *args, **kwargs):
    """The LoRA encoder as a function of its adapters: plain layers with weights W_base + s B @ A."""
    module = wrapper._function_module
    weights = effective_weights(module, adapters, wrapper.lora_weights)
    with adapters_disabled(module):
        return torch.func.functional_call(module, {**wrapper._constants(), **adapters, **weights}, args, kwargs)


class LoRAEncoder(MountedModule):
    """A peft-injected encoder (same parameter names) whose forward is `lora_function` at its current adapters."""

    def __init__(self, model: nn.Module):
        if not adapted_weights(model):
            raise ValueError("LoRAEncoder needs a model with peft LoRA layers (see add_lora)")
        super().__init__(model)
        self.lora_weights = adapted_weights(model)
        self.adapter_names = tuple(n for n, _ in model.named_parameters() if ".lora_" in n)

    def forward(self, *args, **kwargs):
        params = dict(self.named_parameters())
        return lora_function(self, {n: params[n] for n in self.adapter_names}, *args, **kwargs)


class LinearizedLoRA(LinearizedModel):
    """L-LoRA: f(x; W_0, phi_0) + J_phi f(x; W_0, phi_0) (phi - phi_0) over the adapter parameters phi,
    with f = `lora_function` (the LoRA forward written functionally, so that jvp can run through it)."""

    def __init__(self, model: nn.Module):
        if not adapted_weights(model):
            raise ValueError("LinearizedLoRA needs a model with peft LoRA layers (see add_lora)")
        super().__init__(model)
        self.lora_weights = adapted_weights(model)
        bad = [n for n in self.linearized_names if ".lora_" not in n]
        if bad:
            raise ValueError(f"LinearizedLoRA: trainable parameters that are not LoRA adapters: {bad[:5]}")

    def function(self, params: Mapping[str, torch.Tensor], *args, **kwargs):
        return lora_function(self, params, *args, **kwargs)

    def primal_and_tangent(self, *args, **kwargs):
        out = super().primal_and_tangent(*args, **kwargs)
        settle_peft_weights(self._function_module)
        return out
