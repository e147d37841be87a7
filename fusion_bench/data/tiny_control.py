"""The control task of task negation for tiny_eight: images of the tiny CLIP's own pretraining world.

Task negation (Ilharco et al., 2023) removes a task while keeping what the pretrained model knew: its control
task is one the model was good at *before* fine-tuning (ImageNet for CLIP). The tiny CLIP was pretrained on
captioned images of one coloured shape, of some size, at one of five positions (`tiny_images.caption_sample`);
this task draws images the same way and asks for the SHAPE among `tiny_images.SHAPES`, with prompts worded like
the pretraining captions. Its own seed, so the images are disjoint draws from any tiny_eight split.

Note: tiny_eight's own `shapes` task asks the same question about similar images, so negating `shapes` is
expected to hurt this control task; the other seven tasks are the fair test of "forget a task, keep the rest".
"""

from __future__ import annotations

import numpy as np

from . import tiny_images as ti

NAME = "pretraining_shapes"
CLASSNAMES = tuple(ti.SHAPES)
TEMPLATES = ("a photo of a {}.", "a {}.", "a small {}.", "a large {}.", "a photo of a {} shape.")
SPLIT_SIZES = {"val": 200, "test": 500}
SEED = 7_702


def draw(rng: np.random.Generator, label: int) -> np.ndarray:
    """One pretraining-style image (as `caption_sample` draws it) whose shape is SHAPES[label]."""
    shape = ti.SHAPES[label]
    color = list(ti.COLORS)[rng.integers(len(ti.COLORS))]
    pos = list(ti.POSITIONS)[rng.integers(len(ti.POSITIONS))]
    r = rng.uniform(7, 10) if rng.random() < 0.5 else rng.uniform(3.5, 5.5)
    cx, cy = np.clip(np.asarray(ti.POSITIONS[pos]) + rng.uniform(-3, 3, 2), r, ti.SIZE - r)
    img = ti._paint(ti._background(rng), ti.shape_mask(shape, cx, cy, r), ti._jitter(rng, ti.COLORS[color]))
    return ti._finish(rng, img)


def make_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 32 x 32 x 3, int64 labels N), classes balanced; always the same bytes."""
    if split not in SPLIT_SIZES:
        raise KeyError(f"the control task {NAME!r} has the splits {sorted(SPLIT_SIZES)}, not {split!r} "
                       f"(it is evaluated, never trained on)")
    rng = np.random.default_rng([SEED, list(SPLIT_SIZES).index(split)])
    n = SPLIT_SIZES[split]
    labels = rng.permutation(np.arange(n) % len(CLASSNAMES)).astype(np.int64)
    return np.stack([draw(rng, int(y)) for y in labels]), labels
