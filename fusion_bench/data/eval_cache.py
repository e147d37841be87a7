"""Evaluation splits decoded once: the deterministic test-time transform's uint8 output in a memory-mapped .npy.

A benchmark run evaluates the same val images 21 times per method (the coefficient search) and the same test
images once per run; decoding and resizing the JPEGs every time costs more than the forward pass of a ViT-B/32 on
a GPU. With `taskpool.cache_eval=true` the PIL part of open_clip's eval transform (resize, center crop, RGB) runs
once per split and image size, and later reads are uint8 -> float / 255 -> normalize, bitwise what ToTensor and
Normalize compute. The file is written under a temporary name and renamed, so an interrupted build leaves no
cache behind; its name holds a hash of everything that decides its content.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize

log = logging.getLogger(__name__)


def split_transform(transform: Compose) -> tuple[Compose, tuple[float, ...], tuple[float, ...]]:
    """(the PIL steps, mean, std) of an eval transform ending in ToTensor, Normalize (open_clip's)."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], Normalize) or type(steps[-2]).__name__ not in (
            "ToTensor", "MaybeToTensor"):
        raise ValueError(f"cache_eval needs a transform ending in ToTensor, Normalize; got {transform}")
    return Compose(steps[:-2]), tuple(steps[-1].mean), tuple(steps[-1].std)


class _Uint8Images(Dataset):
    """(uint8 [3, H, W] array, label) of a split: its image through the PIL steps only."""

    def __init__(self, split, pil_steps: Compose):
        self.split, self.pil_steps = split, pil_steps

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        image = self.split.dataset[int(self.split.indices[i])][0]
        return torch.from_numpy(np.asarray(self.pil_steps(image), dtype=np.uint8).transpose(2, 0, 1).copy()), 0


class CachedEvalSplit(Dataset):
    """(normalized float image, label) read from the uint8 cache; picklable (the memmap opens lazily).
    `indices` and `labels` are those of the TaskSplit it caches."""

    def __init__(self, path: Path, split, mean, std):
        self.path, self.indices, self.labels = path, split.indices, split.labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._images = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def __getitem__(self, i):
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        x = torch.from_numpy(np.array(self._images[i])).to(torch.float32).div(255)
        return x.sub_(self.mean).div_(self.std), int(self.labels[i])


def cached_eval_split(split, key: str, cache_dir: Path, num_workers: int = 0) -> CachedEvalSplit:
    """`split` (a TaskSplit with a deterministic transform) served from cache_dir/<key>.npy, built if absent."""
    pil_steps, mean, std = split_transform(split.transform)
    path = Path(cache_dir) / f"{key}.npy"
    if path.is_file():
        shape = np.load(path, mmap_mode="r").shape
        if shape[0] == len(split):
            return CachedEvalSplit(path, split, mean, std)
        log.warning("%s holds %d images, the split has %d: rebuilding it", path, shape[0], len(split))
    path.parent.mkdir(parents=True, exist_ok=True)
    images = _Uint8Images(split, pil_steps)
    first = images[0][0]
    tmp = path.with_name(f"{path.stem}.partial-{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), *first.shape))
    log.info("decoding %d images once into %s (%.1f GB)", len(split), path, out.nbytes / 1e9)
    loader = DataLoader(images, batch_size=64, num_workers=num_workers)
    at = 0
    try:
        for x, _ in track(loader, description=f"caching {path.stem}", transient=True):
            out[at:at + len(x)] = x.numpy()
            at += len(x)
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return CachedEvalSplit(path, split, mean, std)
