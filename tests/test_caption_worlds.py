"""The tiny CLIP's caption worlds: deterministic, and `synonyms` never names five task families' classes."""

import numpy as np
import pytest

from fusion_bench.data import tiny_eight
from fusion_bench.data.caption_worlds import WORLDS, world
from fusion_bench.data.tiny_images import caption_sample

FAMILIES = ("textures", "counting", "scenes", "orientation", "digits")


def _draw(name: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [world(name)(rng) for _ in range(n)]


@pytest.mark.parametrize("name", list(WORLDS))
def test_worlds_are_deterministic_images(name):
    a, b = _draw(name, 50), _draw(name, 50)
    assert all((x[0] == y[0]).all() and x[1] == y[1] for x, y in zip(a, b))
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for img, _ in a)


def test_shapes_world_is_the_committed_models():
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        (a, ca), (b, cb) = world("shapes")(rng1), caption_sample(rng2)
        assert (a == b).all() and ca == cb


def _class_words(task: str) -> set[str]:
    return {w for c in tiny_eight.TASKS[task].classnames for w in c.split()} - {"line", "sky"}


def test_synonyms_hide_the_task_class_names_all_words_use_them():
    caps_syn = [c for _, c in _draw("synonyms", 1200)]
    caps_all = [c for _, c in _draw("all_words", 1200)]
    for task in FAMILIES:
        words = _class_words(task)
        hits_syn = sum(any(w in c.split() for w in words) for c in caps_syn)
        hits_all = sum(any(w in c.split() for w in words) for c in caps_all)
        assert hits_syn == 0, (task, [c for c in caps_syn if any(w in c.split() for w in words)][:3])
        assert hits_all > 60, task  # about 13% of 1,200 captions per family
