"""open_clip image encoders and their frozen zero-shot classification heads.

The tiny CLIP is an ordinary open_clip model built from `configs/tiny-clip.json`, so it runs the same code
(create_model, encode_image / encode_text, the bundled tokenizer) as ViT-B/32.

Where pretrained weights come from (`resolve_weights`), first match wins:

1. `model.pretrained=/path` — a file: `.safetensors` (open_clip keys, or a transformers CLIPModel
   `model.safetensors`, converted on the fly), an OpenAI TorchScript archive (`ViT-B-32.pt`), or an open_clip torch
   state dict (`.pt` / `.bin`, read with `weights_only=True`); or a folder holding one of those.
2. `paths.cache_dir` (the model YAML's `cache_dir`), in this order:
   a. `<cache_dir>/<arch>-<tag>.safetensors`, e.g. `ViT-B-32-quickgelu-openai.safetensors` (the canonical flat
      file: `model.download=true` writes it, and `python -m fusion_bench.clip.hf_import` can make it);
   b. open_clip's Hugging Face hub cache layout, as `open_clip.create_model(arch, pretrained=tag,
      cache_dir=cache_dir)` leaves it: `<cache_dir>/models--timm--vit_base_patch32_clip_224.openai/snapshots/
      <revision>/open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`);
   c. open_clip's URL download layout: `<cache_dir>/ViT-B-32.pt` (OpenAI's TorchScript archive).
3. The default caches other tools fill: the Hugging Face hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
   `~/.cache/huggingface/hub`, same layout as 2b) and OpenAI CLIP's `~/.cache/clip/ViT-B-32.pt`.
4. `model.download=true`: open_clip fetches `pretrained=<tag>` into `cache_dir`; the loaded weights are then saved
   as the flat file 2a so later runs read safetensors.

Nothing found: `WeightsNotFoundError` listing every place looked and these ways to provide weights. A model is
never silently left at its random initialisation: every load is strict (all keys, all shapes).
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file
from torch import nn

from fusion_bench.errors import ConfigError, WeightsNotFoundError
from fusion_bench.models.heads import head_logits

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_CHECKPOINT = ASSETS / "tiny_clip.safetensors"
open_clip.add_model_config(CONFIG_DIR)


class WeightsFormatError(ConfigError):
    """A weights file the user named (model.pretrained, finetuned_from) that cannot be used: printed as one line."""


def create_clip(arch: str) -> nn.Module:
    """An open_clip CLIP with random weights (nothing downloaded)."""
    return open_clip.create_model(arch, pretrained=None)


def load_clip(model_cfg: DictConfig, cache_dir: str | Path | None = None) -> nn.Module:
    """The pretrained CLIP named by a `conf/model/*.yaml`; never a silent random init."""
    arch = model_cfg.arch
    tag = _cfg(model_cfg, "pretrained_tag")
    check_quick_gelu(arch, tag)
    cache_dir = cache_dir if cache_dir is not None else _cfg(model_cfg, "cache_dir")
    try:
        path, downloaded = resolve_weights(model_cfg, cache_dir), False
    except WeightsNotFoundError:
        if not _cfg(model_cfg, "download"):
            raise
        path, downloaded = _download(model_cfg, cache_dir), True
    state = read_state_dict(path)
    with _QuietRandomInit():
        model = create_clip(arch)
    load_weights_into(model, state, path, arch)
    if downloaded and cache_dir:
        from fusion_bench.store import atomic_save_safetensors

        flat = flat_weights_path(cache_dir, arch, tag)
        atomic_save_safetensors(model.state_dict(), flat, metadata={"format": "pt", "source": str(path)})
        log.info("saved %s weights as %s", arch, flat)
    log.info("loaded %s weights from %s", arch, path)
    return model.eval()


class _QuietRandomInit(logging.Filter):
    """Drop open_clip's "initialized randomly" warning while building a model that is loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    def __enter__(self):
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def _cfg(model_cfg: DictConfig, key: str):
    try:
        return model_cfg.get(key)
    except OmegaConfBaseException:  # e.g. cache_dir: ${paths.cache_dir} in a model config composed on its own
        return None


def check_quick_gelu(arch: str, tag: str | None) -> None:
    """OpenAI weights were trained with QuickGELU; `ViT-B-32` + openai builds GELU and open_clip only warns."""
    if not tag:
        return
    model_cfg = open_clip.get_model_config(arch) or {}
    wants = open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
    if wants and not model_cfg.get("quick_gelu", False):
        raise ValueError(
            f"model.arch={arch} builds GELU but pretrained_tag={tag} weights were trained with QuickGELU: "
            f"use model.arch={arch}-quickgelu"
        )


# ---- where the weights are ------------------------------------------------------------------------------------------
def flat_weights_path(cache_dir: str | Path, arch: str, tag: str | None) -> Path:
    return Path(cache_dir).expanduser() / f"{arch}-{tag or 'weights'}.safetensors"


def _hub_entry(arch: str, tag: str) -> tuple[str | None, list[str]]:
    """open_clip's hub repo for arch + tag and the file names it downloads from it (safetensors first)."""
    hub = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "")
    if not hub:
        return None, []
    repo, filename = os.path.split(hub)  # 'org/repo/' -> default file names; 'org/repo/file.bin' -> that file
    if filename:
        return repo, [str(Path(filename).with_suffix(".safetensors")), filename]
    return repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def _hub_files(hub_dir: Path, repo: str, names: list[str]) -> list[Path]:
    """Files of `repo` in a Hugging Face hub cache folder, newest snapshot first, in the order of `names`."""
    snapshots = hub_dir / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = []
    for name in names:
        found += sorted(snapshots.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def default_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def weight_candidates(arch: str, tag: str | None, cache_dir: str | Path | None) -> list[Path]:
    """Every place searched for `arch` + `tag` weights, in order; hub entries are snapshot folder patterns."""
    if not tag:
        return []
    repo, names = _hub_entry(arch, tag)
    url = open_clip.get_pretrained_cfg(arch, tag).get("url", "")
    name = os.path.basename(url) if url else None

    def in_folder(folder: Path, flat: bool) -> list[Path]:
        found = [flat_weights_path(folder, arch, tag)] if flat else []
        if repo:
            found.append(folder / f"models--{repo.replace('/', '--')}" / "snapshots" / "*" / names[0])
        return found

    places: list[Path] = []
    if cache_dir:
        cache = Path(cache_dir).expanduser()
        places += in_folder(cache, flat=True) + ([cache / name] if name else [])
    places += in_folder(default_hub_cache(), flat=False)
    if name:
        places.append(Path.home() / ".cache" / "clip" / name)
    return places


def resolve_weights(model_cfg: DictConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the pretrained weights are (see the module docstring), with a clear error listing what was tried."""
    if model_cfg.get("pretrained"):
        path = Path(str(model_cfg.pretrained)).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            found = _checkpoint_in_dir(path)
            if found:
                return found
            raise WeightsNotFoundError(
                f"model.pretrained={path} is a folder without weights (looked for open_clip_model.safetensors, "
                "model.safetensors, open_clip_pytorch_model.bin, pytorch_model.bin, *.safetensors, *.pt)"
            )
        raise WeightsNotFoundError(f"model.pretrained={path} does not exist (model {model_cfg.name}).")
    if model_cfg.name == "tiny_clip":
        if TINY_CHECKPOINT.is_file():
            return TINY_CHECKPOINT
        raise WeightsNotFoundError(f"tiny CLIP weights missing at {TINY_CHECKPOINT}: run `make tiny-pretrain`.")
    arch, tag = model_cfg.arch, _cfg(model_cfg, "pretrained_tag")
    cache_dir = cache_dir if cache_dir is not None else _cfg(model_cfg, "cache_dir")
    places = weight_candidates(arch, tag, cache_dir)
    repo, names = _hub_entry(arch, tag) if tag else (None, [])
    for place in places:
        if "*" in str(place):
            hub = place.parents[3]  # <hub>/models--org--repo/snapshots/*/file
            files = _hub_files(hub, repo, names) if repo else []
            if files:
                return files[0]
        elif place.is_file():
            return place
    raise WeightsNotFoundError(_not_found_message(model_cfg, arch, tag, cache_dir, places))


def _not_found_message(model_cfg, arch, tag, cache_dir, places) -> str:
    looked = "\n".join(f"  - {p}" for p in places) or "  (nothing: the model config has no pretrained_tag)"
    flat = flat_weights_path(cache_dir or "<paths.cache_dir>", arch, tag)
    return (
        f"no pretrained weights for model={model_cfg.name} (open_clip {arch}, pretrained_tag={tag}). Looked in:\n"
        f"{looked}\n"
        "Provide them in one of three ways:\n"
        f"  1. model.pretrained=/path/to/weights (.safetensors with open_clip or transformers CLIPModel keys, "
        "OpenAI's TorchScript .pt, or an open_clip state dict .pt/.bin)\n"
        f"  2. put them under paths.cache_dir={cache_dir}: as {flat.name}, or in open_clip's hub-cache layout "
        "(models--<org>--<repo>/snapshots/<rev>/open_clip_model.safetensors), or as OpenAI's file name "
        "(e.g. ViT-B-32.pt); convert transformers folders with `python -m fusion_bench.clip.hf_import SRC OUT`\n"
        f"  3. model.download=true on a machine with internet access (open_clip pretrained='{tag}', saved to "
        f"{flat})"
    )


def _checkpoint_in_dir(folder: Path) -> Path | None:
    for name in ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                 "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors", "*.pt", "*.pth", "*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def _download(model_cfg: DictConfig, cache_dir) -> Path:
    arch, tag = model_cfg.arch, _cfg(model_cfg, "pretrained_tag")
    pcfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if not pcfg:
        raise WeightsNotFoundError(f"model.download=true but open_clip knows no pretrained_tag={tag} for {arch}")
    try:
        path = open_clip.download_pretrained(pcfg, cache_dir=str(Path(cache_dir).expanduser()) if cache_dir else None)
    except Exception as e:  # no network, hub errors, checksum mismatch
        raise WeightsNotFoundError(
            f"model.download=true: fetching {arch} pretrained={tag} failed ({type(e).__name__}: {e}).\n"
            + _not_found_message(model_cfg, arch, tag, cache_dir, weight_candidates(arch, tag, cache_dir))
        ) from e
    if not path:
        raise WeightsNotFoundError(f"open_clip returned no file for {arch} pretrained={tag}")
    return Path(path)


# ---- reading and fitting --------------------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict in open_clip key names from any supported weights file; never unpickles arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif _is_torchscript(path):
        # OpenAI's released checkpoints are TorchScript archives; torch.load(weights_only=True) refuses them and
        # TorchScript deserialisation does not run Python pickles of arbitrary classes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": still OpenAI's format
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsFormatError(
                f"{path} is not a plain tensor checkpoint ({type(e).__name__}). If it is a whole pickled module "
                "(e.g. from the task-vectors code), convert it once, only if you trust it: python -m "
                f"fusion_bench.clip.hf_import {path} OUT.safetensors --allow-unsafe-pickle"
            ) from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsFormatError(f"{path} does not hold a state dict of tensors")
        state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    from fusion_bench.clip.hf_import import hf_to_open_clip, is_hf_clip_state

    if is_hf_clip_state(state):
        state = hf_to_open_clip(state)
    return state


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        for b in module._non_persistent_buffers_set:
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source, arch: str) -> None:
    """Strict load of `state` into `model` with errors naming the file, the architecture and the keys."""
    skip = _non_persistent_buffers(model)
    state = {k: v for k, v in state.items() if k not in skip}
    if "logit_scale" in state and state["logit_scale"].shape != model.logit_scale.shape:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    expected = set(model.state_dict())
    if state and all(k.startswith("visual.") for k in state) and any(not k.startswith("visual.") for k in expected):
        raise WeightsFormatError(
            f"{source} holds only an image encoder (visual.* keys); model.pretrained needs a whole CLIP (the text "
            "tower builds the zero-shot heads). Merge it as a fine-tuned encoder with finetuned_from=..., or convert a "
            "full transformers CLIPModel instead of a CLIPVisionModel."
        )
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsFormatError(
            f"{source} does not fit open_clip {arch!r}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsFormatError(f"{source} does not fit open_clip {arch!r}: {e}") from e


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
    """An image encoder followed by a head; logits = head @ normalise(encoder(x)), in fp32. A tensor head is a
    frozen copy (the zero-shot head); an `nn.Parameter` head is registered as it is and trains with the encoder
    (finetune.train_head: the caller keeps the parameter and reads the trained head from it)."""

    def __init__(self, encoder: nn.Module, head: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        if isinstance(head, nn.Parameter):
            self.head = head
        else:
            self.register_buffer("head", head.detach().clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return head_logits(self.encoder(images), self.head)
