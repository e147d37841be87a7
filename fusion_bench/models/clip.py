"""open_clip image encoders and their frozen zero-shot classification heads.

The tiny CLIP is an ordinary open_clip model built from `configs/tiny-clip.json`, so it runs the same code
(create_model, encode_image / encode_text, the bundled tokenizer) as ViT-B/32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_CHECKPOINT = ASSETS / "tiny_clip.safetensors"
open_clip.add_model_config(CONFIG_DIR)


class WeightsNotFoundError(FileNotFoundError):
    pass


def create_clip(arch: str) -> nn.Module:
    """An open_clip CLIP with random weights (nothing downloaded)."""
    return open_clip.create_model(arch, pretrained=None)


def load_clip(model_cfg: DictConfig) -> nn.Module:
    """The pretrained CLIP named by a `conf/model/*.yaml`; never a silent random init."""
    arch = model_cfg.arch
    path = resolve_weights(model_cfg)
    model = create_clip(arch)
    state = load_file(str(path)) if str(path).endswith(".safetensors") else _load_torch(path)
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit open_clip {arch!r}: missing keys {missing[:5]}..., unexpected {unexpected[:5]}..."
        )
    return model.eval()


def _load_torch(path: Path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def resolve_weights(model_cfg: DictConfig) -> Path:
    """Where the pretrained weights are: model.pretrained (a file) or the tiny asset, with a clear error."""
    if model_cfg.get("pretrained"):
        path = Path(str(model_cfg.pretrained)).expanduser()
        if path.is_file():
            return path
        raise WeightsNotFoundError(f"model.pretrained={path} does not exist (model {model_cfg.name}).")
    if model_cfg.name == "tiny_clip":
        if TINY_CHECKPOINT.is_file():
            return TINY_CHECKPOINT
        raise WeightsNotFoundError(f"tiny CLIP weights missing at {TINY_CHECKPOINT}: run `make tiny-pretrain`.")
    raise WeightsNotFoundError(f"no weights configured for model {model_cfg.name}; set model.pretrained=/path/to/file")


def image_norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pp = model.visual.preprocess_cfg
    return tuple(pp["mean"]), tuple(pp["std"])


@torch.no_grad()
def zero_shot_head(model: nn.Module, tokenizer, classnames, templates) -> torch.Tensor:
    """[classes, embed_dim]: logit_scale * normalised mean over templates of normalised text embeddings."""
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates])
        emb = model.encode_text(tokens, normalize=True).mean(dim=0)
        rows.append(emb / emb.norm())
    return model.logit_scale.exp() * torch.stack(rows)


class ImageClassifier(nn.Module):
    """An image encoder followed by a frozen zero-shot head; logits = head @ normalise(encoder(x))."""

    def __init__(self, encoder: nn.Module, head: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", head.detach().clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(images)
        return (feats / feats.norm(dim=-1, keepdim=True)) @ self.head.T
