"""ImageNet-1k for the task-negation control task: the 1,000 WordNet ids (the folder names of
`imagenet/val/<wnid>/`, in the sorted order that defines the standard class indices), the class names CLIP's
authors wrote for zero-shot ImageNet, and their 80 prompt templates as plain format strings (openai/CLIP
`notebooks/Prompt_Engineering_for_ImageNet.ipynb`, MIT licence; the same lists open_clip ships as lambdas in
`open_clip/zero_shot_metadata.py`). Plain data: no lambdas, picklable.

The data lives in `fusion_bench/assets/imagenet_names.json` ({"wnids": [...], "classes": [...], "templates":
[...]}, index-aligned lists), read once at import; the names below are tuples of str."""

from __future__ import annotations

import json
from importlib.resources import files

_DATA = json.loads((files("fusion_bench") / "assets" / "imagenet_names.json").read_text(encoding="utf-8"))

IMAGENET_WNIDS: tuple[str, ...] = tuple(_DATA["wnids"])
IMAGENET_CLASSES: tuple[str, ...] = tuple(_DATA["classes"])
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(_DATA["templates"])

del _DATA
