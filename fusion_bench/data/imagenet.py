"""ImageNet's validation images as the control task of task negation (taskpool=eight_tasks).

Read from `<data_root>/imagenet/val/<wnid>/*.JPEG` (ImageNet's 50,000 validation images sorted into one folder per
class, as torchvision's ImageFolder reads them; class names from `imagenet_names.py`, matched by WordNet id, so
a folder holding only some classes still gets the right labels). Nothing is downloaded.

Task negation picks its coefficient on val and reports test, so the official val images are split in two, as
the eight tasks carve val from train (`eight_tasks.carve_val`): `val` = 10% (at most 5,000, seed 0), `test` = the
rest (45,000 of the full set). Both use open_clip's test-time transform; with `taskpool.cache_eval` they are
decoded once into the same uint8 cache the eight tasks use.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .eight_tasks import (
    DatasetFormatError,
    DatasetNotFoundError,
    Source,
    TaskSplit,
    carve_val,
    clip_transform,
)
from .imagenet_names import IMAGENET_CLASSES, IMAGENET_TEMPLATES, IMAGENET_WNIDS

log = logging.getLogger(__name__)

NAME = "imagenet"
CLASSNAMES = IMAGENET_CLASSES
TEMPLATES = IMAGENET_TEMPLATES
VAL_FRACTION, MAX_VAL, SPLIT_SEED = 0.1, 5000, 0


def val_folder(data_root: str | Path) -> Path:
    return Path(data_root).expanduser() / "imagenet" / "val"


def _source(folder: Path) -> Source:
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"control task imagenet: no folder {folder}. Task negation on taskpool=eight_tasks measures the control "
            f"accuracy on ImageNet's validation images in ImageFolder layout: {folder}/<wnid>/*.JPEG, e.g. "
            f"{folder}/n01440764/ILSVRC2012_val_00000293.JPEG (one folder per class, named by WordNet id). Put "
            f"them there or point paths.data_root (taskpool.control.data_root) at the folder holding imagenet/; "
            f"nothing is downloaded.")
    ds = ImageFolder(str(folder))
    unknown = [c for c in ds.classes if c not in IMAGENET_WNIDS]
    if unknown:
        raise DatasetFormatError(f"control task imagenet: {folder} has class folders that are not ImageNet-1k "
                                 f"WordNet ids: {unknown[:5]} (expected names like n01440764)")
    if len(ds.classes) < len(IMAGENET_WNIDS):
        log.warning("control task imagenet: %s holds %d of the 1000 classes; the head still has all 1000",
                    folder, len(ds.classes))
    table = np.array([IMAGENET_WNIDS.index(c) for c in ds.classes], dtype=np.int64)
    return Source(ds, table[np.asarray(ds.targets, dtype=np.int64)])


def load_split(data_root: str | Path, split: str, image_size, mean, std, eval_cache: Path | None = None,
               num_workers: int = 0) -> Dataset:
    """The control task's `val` or `test` split (see the module docstring)."""
    if split not in ("val", "test"):
        raise KeyError(f"the control task imagenet has the splits val and test, not {split!r}")
    folder = val_folder(data_root)
    src = _source(folder)
    test, val = carve_val(len(src.labels), VAL_FRACTION, MAX_VAL, SPLIT_SEED)
    data = TaskSplit(src, val if split == "val" else test, clip_transform(image_size, mean, std, False))
    if eval_cache is None:
        return data
    from .eval_cache import cached_eval_split

    h = hashlib.sha256(repr((NAME, split, str(folder.resolve()), repr(data.transform))).encode()
                       + data.indices.tobytes() + data.labels.tobytes())
    return cached_eval_split(data, f"{NAME}-{split}-{h.hexdigest()[:16]}", eval_cache, num_workers)
