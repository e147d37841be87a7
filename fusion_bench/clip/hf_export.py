"""Export open_clip CLIP weights to Hugging Face transformers: the inverse of fusion_bench.clip.hf_import.

* `open_clip_to_hf(state)`: open_clip key names -> transformers `CLIPModel` names, the exact inverse of
  `hf_import.hf_to_open_clip` (tested both ways, tensor for tensor): `attn.in_proj_weight` / `in_proj_bias` split
  into q, k, v (the order `nn.MultiheadAttention` uses), `visual.proj` / `text_projection` transposed into
  `visual_projection.weight` / `text_projection.weight`, the rest renamed. Vision keys come out as
  `vision_model.*` (the names inside `CLIPModel` and `CLIPVisionModelWithProjection`).
* `hf_clip_config(arch)`: the transformers `CLIPConfig` of an open_clip architecture, built locally from open_clip's
  model config (nothing downloaded). Only the plain OpenAI-style ViT CLIP has an equivalent; anything else
  (ResNet or timm image towers, Hugging Face text towers, attentional pooling, layer scale, SigLIP's logit bias, ...)
  raises `NoTransformersEquivalent` naming what differs. The text config keeps `eos_token_id=2`, as OpenAI's
  released CLIP configs do: transformers then pools the text at the argmax token id, exactly as open_clip does.
* `save_hf_clip(state, arch, out)`: a `save_pretrained` folder of `CLIPModel` (text keys present),
  `CLIPVisionModelWithProjection` (image tower with `visual.proj`) or `CLIPVisionModel`, written atomically, with
  a `preprocessor_config.json` (CLIPImageProcessor) when the image preprocessing is given. No tokenizer is
  written: the tokens are open_clip's (`open_clip.get_tokenizer(arch)`), the same BPE as OpenAI's CLIPTokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from fusion_bench.clip.hf_import import _BLOCK, _TEXT, _VISION

_VISION_INV = {v: k for k, v in _VISION.items()}
_TEXT_INV = {v: k for k, v in _TEXT.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")

# what transformers' CLIPVisionTransformer / CLIPTextTransformer compute: open_clip's defaults for these options
_PLAIN_VISION = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
                 "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None,
                 "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                 "scale_attn": False, "scale_fc": False, "timm_model_name": None}
_PLAIN_TEXT = {"hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
               "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
               "act_kwargs": None, "norm_kwargs": None, "qk_norm": False, "scaled_cosine_attn": False,
               "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}
_TOP_LEVEL = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "custom_text"}


class NoTransformersEquivalent(ValueError):
    """An open_clip architecture that transformers' CLIPModel cannot express."""


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP key names (image tower under `visual.`) -> transformers CLIPModel key names."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == "visual.proj":
            out["visual_projection.weight"] = value.T.contiguous()
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
            continue
        if key == "logit_scale":
            out["logit_scale"] = value.reshape(())
            continue
        vision = key.startswith("visual.")
        tower, rest = ("vision_model", key[len("visual."):]) if vision else ("text_model", key)
        named = (_VISION_INV if vision else _TEXT_INV).get(rest)
        if named is not None:
            out[f"{tower}.{named}"] = value
            continue
        m = _RESBLOCK.match(rest)
        if m is None:
            unknown.append(key)
            continue
        layer, sub = f"{tower}.encoder.layers.{m.group(1)}", m.group(2)
        if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = sub.rsplit("_", 1)[1]
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{layer}.self_attn.{name}_proj.{kind}"] = part.clone()  # no shared storage in the file
            continue
        module, _, kind = sub.rpartition(".")
        if module in _BLOCK_INV and kind in ("weight", "bias"):
            out[f"{layer}.{_BLOCK_INV[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip ViT CLIP state dict: no transformers name for {unknown[:8]} "
                         f"({len(unknown)} in all)")
    return out


def _differences(cfg, plain: dict, where: str) -> list[str]:
    """The options of an open_clip tower config that differ from what transformers' CLIP computes ({} = None)."""
    return [f"{where}.{k}={getattr(cfg, k)!r}" for k, v in plain.items() if (getattr(cfg, k) or v) != v]


def hf_clip_config(arch: str):
    """transformers `CLIPConfig` equal to open_clip's `arch` (its `vision_config` for an image tower alone)."""
    from transformers import CLIPConfig

    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise NoTransformersEquivalent(f"open_clip knows no architecture {arch!r}")
    vision, text = CLIPVisionCfg(**model_cfg["vision_cfg"]), CLIPTextCfg(**model_cfg["text_cfg"])
    problems = [f"option {k}={model_cfg[k]!r}" for k in model_cfg if k not in _TOP_LEVEL]
    if model_cfg.get("custom_text"):
        problems.append("custom_text=True (a separate text module, CustomTextCLIP)")
    if not isinstance(vision.layers, int):
        problems.append(f"vision_cfg.layers={vision.layers} (a ModifiedResNet image tower)")
    size = vision.image_size if isinstance(vision.image_size, int) else tuple(vision.image_size)
    if isinstance(size, tuple) and len(set(size)) != 1:
        problems.append(f"vision_cfg.image_size={size} (transformers' CLIP images are square)")
    if vision.width % vision.head_width:
        problems.append(f"vision_cfg.width={vision.width} is not a multiple of head_width={vision.head_width}")
    problems += _differences(vision, _PLAIN_VISION, "vision_cfg") + _differences(text, _PLAIN_TEXT, "text_cfg")
    if vision.block_type not in (None, "default") or text.block_type not in (None, "default"):
        problems.append("a custom attention block_type")
    if problems:
        raise NoTransformersEquivalent(
            f"open_clip {arch!r} has no transformers CLIPModel equivalent: {'; '.join(problems)}. transformers' CLIP "
            "is the plain OpenAI ViT (class token, pre-LayerNorm blocks, argmax text pooling)")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # open_clip: nn.GELU (erf), as transformers'
    embed = int(model_cfg["embed_dim"])
    common = {"hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": embed, "attention_dropout": 0.0}
    vision_config = {**common, "hidden_size": vision.width, "intermediate_size": int(vision.width * vision.mlp_ratio),
                     "num_hidden_layers": vision.layers, "num_attention_heads": vision.width // vision.head_width,
                     "image_size": size if isinstance(size, int) else size[0], "patch_size": vision.patch_size,
                     "num_channels": 3}
    text_config = {**common, "hidden_size": text.width, "intermediate_size": int(text.width * text.mlp_ratio),
                   "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
                   "max_position_embeddings": text.context_length, "vocab_size": text.vocab_size,
                   "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # eos 2: argmax pooling (see above)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed)


def _model_class(hf: dict[str, torch.Tensor]):
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    if any(k.startswith("text_model.") for k in hf):
        return CLIPModel
    return CLIPVisionModelWithProjection if "visual_projection.weight" in hf else CLIPVisionModel


def hf_clip_model(state: dict[str, torch.Tensor], arch: str):
    """The transformers CLIP model (class chosen by the keys) holding `state` (open_clip names), strictly loaded."""
    from transformers import CLIPModel

    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    hf, config = open_clip_to_hf(state), hf_clip_config(arch)
    cls = _model_class(hf)
    with no_init_weights():  # no random init: every parameter is loaded from `hf` next
        model = cls(config if cls is CLIPModel else config.vision_config)
    if not any(k.startswith("vision_model.") for k in model.state_dict()):  # transformers 5 CLIPVisionModel
        hf = {k.removeprefix("vision_model."): v for k, v in hf.items()}
    try:
        model.load_state_dict(hf, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights do not fit transformers {cls.__name__} of open_clip {arch!r}: {e}") from e
    return model.eval()


def image_processor(preprocess: dict):
    """transformers CLIPImageProcessor of open_clip's `preprocess_cfg` (resize shortest side, center crop, normalise)."""
    from transformers import CLIPImageProcessor

    size = preprocess["size"]
    size = size if isinstance(size, int) else size[0]
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}[preprocess.get("interpolation", "bicubic")]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              resample=resample, image_mean=list(preprocess["mean"]), image_std=list(preprocess["std"]))


def save_hf_clip(state: dict[str, torch.Tensor], arch: str, out: str | Path, preprocess: dict | None = None) -> Path:
    """A transformers `save_pretrained` folder at `out` (which must not exist) of open_clip weights `state`."""
    from fusion_bench.export.files import new_dir

    model = hf_clip_model(state, arch)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if preprocess is not None:
            image_processor(preprocess).save_pretrained(tmp)

    return new_dir(out, write)
