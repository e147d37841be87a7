"""Fine-tuned image encoders researchers already have, merged instead of fine-tuning again.

`finetuned_from='/ckpts/clip-vit-base-patch32_{task}'` (a path with `{task}`, or a task -> path mapping) names,
per task, a transformers `save_pretrained` folder (CLIPVisionModel, CLIPVisionModelWithProjection or CLIPModel,
as published for the eight tasks) or a weights file load_clip reads (safetensors, torch state dict, TorchScript;
open_clip or transformers keys; a whole CLIP or its image encoder). Each is read once, checked against the
pretrained encoder key by key and shape by shape, and stored like a fine-tune of mode `standard`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from fusion_bench.clip.hf_import import hf_to_open_clip, read_hf_folder
from fusion_bench.clip.model import WeightsFormatError, read_state_dict
from fusion_bench.errors import MissingFileError, one_line

log = logging.getLogger(__name__)

FAR = 0.5  # ||theta - theta_0|| / ||theta_0|| above this: hardly a fine-tune of these pretrained weights


def finetuned_source(spec, task: str) -> Path | None:
    """The imported checkpoint for `task`, or None where the task is fine-tuned here."""
    if not spec:
        return None
    if isinstance(spec, Mapping):
        value = spec.get(task)
        return None if value is None else Path(str(value)).expanduser()
    return Path(str(spec).format(task=task)).expanduser()


def read_encoder(src: Path) -> dict[str, torch.Tensor]:
    """The image-encoder weights in `src`, in open_clip's names without the `visual.` prefix."""
    if not src.exists():
        raise MissingFileError(f"finetuned_from: no such fine-tuned checkpoint {src}")
    state = hf_to_open_clip(read_hf_folder(src)) if src.is_dir() else read_state_dict(src)
    if any(k.startswith("visual.") for k in state):  # a whole CLIP, or a converted image encoder
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def import_encoder(src: Path, pretrained: Mapping[str, torch.Tensor], task: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """The fine-tuned encoder in `src` as a state over exactly the keys of `pretrained` (fp32), checked before it
    goes anywhere: readable, the keys and shapes of `pretrained`, every value finite. Every refusal is a
    WeightsFormatError (a ConfigError) naming the file and the task it was given for."""
    who = f"finetuned_from: {src}" + (f" (the fine-tune of task {task!r})" if task else "")
    try:
        state = read_encoder(src)
    except MissingFileError:
        raise
    except WeightsFormatError as e:  # the reader's own refusal (e.g. a pickle without the opt-in flag): keep its advice
        raise WeightsFormatError(f"{who}: {one_line(e)}") from e
    except Exception as e:  # whatever the reader of a broken file raises (safetensors, torch, json, zip)
        raise WeightsFormatError(f"{who} is not a readable weights file ({type(e).__name__}: {one_line(e)}): give a "
                                 f"safetensors file, a torch state dict or a transformers save_pretrained folder"
                                 ) from e
    if "proj" in pretrained and "proj" not in state:  # a CLIPVisionModel has no projection: it stays pretrained
        log.info("%s has no visual projection: keeping the pretrained one", src)
        state["proj"] = pretrained["proj"]
    missing, unexpected = sorted(set(pretrained) - set(state)), sorted(set(state) - set(pretrained))
    if missing or unexpected:
        raise WeightsFormatError(f"{who} is not a fine-tune of this image encoder: {len(missing)} missing keys "
                                 f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in pretrained.items() if state[k].shape != v.shape]
    if wrong:
        raise WeightsFormatError(f"{who} has other shapes than this model (another architecture?): {wrong[:3]} "
                                 f"(key, checkpoint, model)")
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise WeightsFormatError(f"{who}: tensor {k!r} holds NaN or Inf ({bad} of {v.numel()} values)")
    state = {k: state[k].float() for k in pretrained}
    diff = torch.sqrt(sum(((state[k] - v.float()) ** 2).sum() for k, v in pretrained.items()))
    norm = torch.sqrt(sum((v.float() ** 2).sum() for v in pretrained.values()))
    if diff > FAR * norm:
        log.warning("finetuned_from: %s is %.0f%% of the pretrained weights' norm away from them: was it fine-tuned "
                    "from other pretrained weights? Its task vector would be meaningless.", src, 100 * diff / norm)
    return state
