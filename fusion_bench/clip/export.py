"""A merged CLIP image tower as a whole CLIP: an open_clip state dict file, or a transformers CLIPModel folder.

Both hold the merged image tower and, from the pretrained model, the text tower, `text_projection` and
`logit_scale`, so the zero-shot heads of any class names can be rebuilt from them. The open_clip file is what
`open_clip.create_model(arch, pretrained=FILE)` loads: open_clip 3.x picks `safetensors.torch.load_file` for a
`.safetensors` suffix (else `torch.load(weights_only=True)`) and loads strictly, every key of the model present.
An architecture that open_clip does not know by itself (the tiny CLIP: fusion_bench/clip/configs/) gets its model
config written beside the file, so that it loads without this package:

    open_clip.add_model_config("merged_open_clip/tiny-clip.json")   # or the run dir's tiny-clip.json
    model = open_clip.create_model("tiny-clip", pretrained="merged_open_clip.safetensors")
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fusion_bench.clip.model import CONFIG_DIR  # the architectures this project adds to open_clip
from fusion_bench.export.files import new_file


def whole_clip_state(pretrained_clip: dict[str, torch.Tensor], visual: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """The pretrained CLIP's state dict with the image tower (`visual.*`) replaced by `visual` (its own names)."""
    old = {k.removeprefix("visual.") for k in pretrained_clip if k.startswith("visual.")}
    if old != set(visual):
        raise KeyError(f"the merged image tower does not fit the pretrained CLIP: missing {sorted(old - set(visual))[:5]}"
                       f", unexpected {sorted(set(visual) - old)[:5]}")
    state = {k: v for k, v in pretrained_clip.items() if not k.startswith("visual.")}
    state.update({f"visual.{k}": v.to(pretrained_clip[f"visual.{k}"].dtype) for k, v in visual.items()})
    return state


def write_open_clip(state: dict[str, torch.Tensor], arch: str, out: str | Path) -> Path:
    """An open_clip state dict file (safetensors, open_clip key names) at `out`, which must not exist."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: open_clip reads safetensors files by their .safetensors suffix")
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    meta = {"format": "pt", "keys": "open_clip", "arch": arch,
            "load": f"open_clip.create_model({arch!r}, pretrained=FILE)"}
    own = CONFIG_DIR / f"{arch}.json"  # an architecture of this project: its config travels with the weights
    if own.is_file():
        meta["load"] = f"open_clip.add_model_config({arch + '.json'!r}); " + meta["load"]
        config = out.parent / own.name
        if not config.exists():  # per-task files share one folder, and one config
            new_file(config, lambda tmp: shutil.copyfile(own, tmp))
    return new_file(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
