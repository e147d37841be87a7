"""tiny_eight: eight distinct 32x32 classification tasks made offline, a stand-in for the eight-task benchmark.

Each task has class names, prompt templates (plain format strings) and deterministic train / val / test splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import tiny_images as ti

SPLIT_SIZES = {"train": 1800, "val": 200, "test": 500}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TinyTask:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    draw: Callable | None  # (rng, label) -> image; None for digits


TASKS: dict[str, TinyTask] = {
    t.name: t
    for t in [
        TinyTask(
            "digits",
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
            ("a photo of the number {}.", "a drawing of the digit {}.", "the handwritten number {}."),
            None,
        ),
        TinyTask("shapes", tuple(ti.SHAPES), ("a photo of a {}.", "a {} shape.", "a drawing of a {}."), ti.draw_shape),
        TinyTask(
            "colors", tuple(ti.COLORS), ("a photo of something {}.", "a {} object.", "the colour {}."), ti.draw_color
        ),
        TinyTask(
            "textures", tuple(ti.TEXTURES), ("a photo of a {} texture.", "a {} pattern.", "{}."), ti.draw_texture
        ),
        TinyTask(
            "counting",
            ("one", "two", "three", "four", "five"),
            ("a photo of {} dots.", "there are {} circles.", "{} small dots."),
            ti.draw_count,
        ),
        TinyTask(
            "position",
            tuple(ti.POSITIONS),
            ("a photo of a shape in the {}.", "an object in the {}.", "something in the {}."),
            ti.draw_position,
        ),
        TinyTask(
            "scenes", tuple(ti.SCENES), ("a photo of a {}.", "a landscape of a {}.", "a view of the {}."), ti.draw_scene
        ),
        TinyTask(
            "orientation",
            tuple(ti.ORIENTATIONS),
            ("a photo of a {}.", "a drawing of a {}.", "a single {}."),
            ti.draw_orientation,
        ),
    ]
}


def _digits_split(split: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    glyphs, labels = ti.sklearn_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    n_test, n_val = 400, 140
    idx = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}[split]
    if split == "train":  # two renderings of each training glyph (fresh offsets and colours)
        idx = np.concatenate([idx, idx])
    return np.stack([ti.draw_digit(rng, glyphs[i]) for i in idx]), labels[idx]


def make_split(task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 32 x 32 x 3, int64 labels N) for one task and split; always the same bytes."""
    if task not in TASKS:
        raise KeyError(f"unknown tiny task {task!r}; known tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
    spec = TASKS[task]
    rng = np.random.default_rng([list(TASKS).index(task), SPLITS.index(split), 2026])
    if spec.draw is None:
        return _digits_split(split, rng)
    n = SPLIT_SIZES[split]
    labels = rng.permutation(np.arange(n) % len(spec.classnames)).astype(np.int64)
    return np.stack([spec.draw(rng, int(y)) for y in labels]), labels


def to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
