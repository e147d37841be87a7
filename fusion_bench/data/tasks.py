"""Task registry: a task pool config + a task name -> class names, templates and split data sets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    if taskpool.source == "eight_tasks":
        from .eight_tasks import TASKS

        return list(TASKS)
    raise ValueError(f"unknown task pool source taskpool.source={taskpool.source!r}")


def load_task(taskpool: DictConfig, name: str, mean, std, data_dir: str | Path, image_size=224,
              data_root: str | Path | None = None) -> Task:
    """One task of the pool; images normalised with the model's mean / std.

    tiny: generated tensors cached in data_dir. eight_tasks: image files under data_root (default
    taskpool.data_root), resized / cropped to image_size (the model's `visual.image_size`) by open_clip's transforms.
    """
    if taskpool.source == "tiny":
        from . import tiny_eight

        spec = tiny_eight.TASKS[name]

        def load(split: str) -> Dataset:
            images, labels = _cached_split(Path(data_dir) / f"tiny_eight-v{taskpool.version}", name, split)
            return TensorDataset(tiny_eight.to_tensor(images, mean, std), torch.from_numpy(labels))

        return Task(name, list(spec.classnames), list(spec.templates), load)
    if taskpool.source == "eight_tasks":
        from . import eight_tasks

        root = data_root if data_root is not None else taskpool.get("data_root")
        if root is None:
            raise ValueError("taskpool.data_root is not set (conf/taskpool/eight_tasks.yaml: ${paths.data_root})")
        layout, where = eight_tasks.find_layout(name, root)
        spec = eight_tasks.TASKS[name]
        loader = eight_tasks.SplitLoader(
            spec, layout, where, image_size, mean, std,
            train_augment=bool(taskpool.get("train_augment", True)),
            val_fraction=float(taskpool.get("val_fraction", 0.1)),
            max_val=int(taskpool.get("max_val", 5000)),
            seed=int(taskpool.get("split_seed", 0)),
            eval_cache=Path(data_dir) / "eval_cache" if taskpool.get("cache_eval") else None,
            num_workers=int(taskpool.get("num_workers", 0)),
        )
        return Task(name, list(spec.classnames), list(spec.templates), loader)
    raise ValueError(f"unknown task pool source taskpool.source={taskpool.source!r}")


CONTROL_SOURCES = ("tiny_control", "imagenet")


def load_control(taskpool: DictConfig, mean, std, data_dir: str | Path, image_size=224) -> Task:
    """The pool's control task (`taskpool.control`): what task negation must not forget. Evaluated only (val and
    test splits). tiny_control: the tiny CLIP's pretraining images (tiny_control.py); imagenet: ImageNet's val
    images under `control.data_root` (default taskpool.data_root; imagenet.py)."""
    ctrl = taskpool.get("control")
    if not ctrl:
        raise ValueError(f"taskpool={taskpool.name} has no control task: add `control: {{source: ...}}` (one of "
                         f"{CONTROL_SOURCES}) to conf/taskpool/{taskpool.name}.yaml")
    if ctrl.get("source") == "tiny_control":
        from . import tiny_control
        from .tiny_eight import to_tensor

        def load(split: str) -> Dataset:
            images, labels = tiny_control.make_split(split)
            return TensorDataset(to_tensor(images, mean, std), torch.from_numpy(labels))

        return Task(tiny_control.NAME, list(tiny_control.CLASSNAMES), list(tiny_control.TEMPLATES), load)
    if ctrl.get("source") == "imagenet":
        from . import imagenet

        root = ctrl.get("data_root") or taskpool.get("data_root")
        if root is None:
            raise ValueError("taskpool.control.data_root is not set (the folder holding imagenet/val/<wnid>/)")
        cache = Path(data_dir) / "eval_cache" if taskpool.get("cache_eval") else None
        workers = int(taskpool.get("num_workers", 0))
        return Task(imagenet.NAME, list(imagenet.CLASSNAMES), list(imagenet.TEMPLATES),
                    lambda split: imagenet.load_split(root, split, image_size, mean, std, cache, workers))
    raise ValueError(f"taskpool.control.source={ctrl.get('source')!r}: expected one of {CONTROL_SOURCES}")


def _cached_split(root: Path, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from .tiny_eight import make_split

    path = root / f"{task}-{split}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["images"], f["labels"]
    images, labels = make_split(task, split)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, images=images, labels=labels)

    atomic_write(path, write)
    return images, labels
