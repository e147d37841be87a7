"""Task registry: a task pool config + a task name -> class names, templates and split data sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, TensorDataset

from fusion_bench.store import atomic_write


@dataclass
class Task:
    name: str
    classnames: list[str]
    templates: list[str]
    _load: Callable[[str], Dataset]
    _cache: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, split: str) -> Dataset:
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return self._cache[split]


def known_tasks(taskpool: DictConfig) -> list[str]:
    if taskpool.source == "tiny":
        from .tiny_eight import TASKS

        return list(TASKS)
    raise ValueError(f"unknown task pool source taskpool.source={taskpool.source!r}")


def load_task(taskpool: DictConfig, name: str, mean, std, data_dir: str | Path) -> Task:
    """One task of the pool; images normalised with the model's mean / std."""
    if taskpool.source == "tiny":
        from . import tiny_eight

        spec = tiny_eight.TASKS[name]

        def load(split: str) -> Dataset:
            images, labels = _cached_split(Path(data_dir) / "tiny_eight", name, split)
            return TensorDataset(tiny_eight.to_tensor(images, mean, std), torch.from_numpy(labels))

        return Task(name, list(spec.classnames), list(spec.templates), load)
    raise ValueError(f"unknown task pool source taskpool.source={taskpool.source!r}")


def _cached_split(root: Path, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from .tiny_eight import make_split

    path = root / f"{task}-{split}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["images"], f["labels"]
    images, labels = make_split(task, split)
    atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), images=images, labels=labels))
    return images, labels
