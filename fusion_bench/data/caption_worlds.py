"""Caption worlds the tiny CLIP can be pretrained on (`python -m fusion_bench.clip.tiny_pretrain --world NAME`).

* `shapes` (the committed tiny CLIP): one coloured shape of some size and position, captioned with some of those
  words (`tiny_images.caption_sample`). Of tiny_eight it has seen shapes, colours and positions; digits, textures,
  counting, scenes and orientation never.
* `all_words`: 35% such shapes and 13% each of textures, dot counts, lines, landscapes and printed digits, drawn
  unlike the tasks draw them (patterns in a patch, squares instead of dots, thicker and shorter lines, flat horizons,
  a 5 x 7 printed font instead of handwriting) and captioned with the tasks' own class words.
* `synonyms`: the same images, but those five families captioned with words the tasks' prompts never use
  ("bands across" for horizontal stripes, "2 objects" for two dots, "dunes" for desert, "the sign 7" for seven):
  the image tower learns the concepts, the text tower does not learn the tasks' names for them.

These are calibration experiments for issue 16 (README "Calibrating the tiny benchmark"); every world is
deterministic for a given numpy generator.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .tiny_images import (
    _XX,
    _YY,
    COLORS,
    ORIENTATIONS,
    SCENES,
    SIZE,
    TEXTURES,
    _background,
    _finish,
    _jitter,
    _paint,
    caption_sample,
    line_mask,
    shape_mask,
    texture_mask,
)

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FONT = {  # 5 x 7 printed digits
    0: ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    1: ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    2: ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    3: ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    4: ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    5: ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    6: ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    7: ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    8: ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    9: ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
GLYPHS = {d: np.array([[c == "1" for c in row] for row in rows], np.float32) for d, rows in _FONT.items()}

TEXTURE_SYNONYMS = {"horizontal stripes": "bands across", "vertical stripes": "bands up and down",
                    "diagonal stripes": "slanted bands", "checkerboard": "chess grid", "polka dots": "round spots",
                    "speckles": "grainy noise"}
ORIENTATION_SYNONYMS = {"horizontal line": "flat bar", "rising diagonal line": "bar tilted up",
                        "vertical line": "upright bar", "falling diagonal line": "bar tilted down"}
SCENE_SYNONYMS = {"beach": "sand by the water", "forest": "green trees", "ocean": "open water", "desert": "dunes",
                  "snowfield": "white snow", "night sky": "darkness"}


def _color_name(rng: np.random.Generator) -> str:
    return list(COLORS)[rng.integers(len(COLORS))]


def _pick(rng: np.random.Generator, forms: list[str]) -> str:
    return forms[rng.integers(len(forms))]


def _texture(rng, synonyms: bool):
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    p = rng.uniform(4, 7)
    # the other diagonal than the task draws, smaller dots, sparser speckles
    m = texture_mask(rng, kind, p, rng.uniform(0, p), diagonal=-1, dot_radius=1 / 3.5, speckle=0.2)
    x0, y0 = rng.uniform(0, 10, 2)
    w, h = rng.uniform(18, 30, 2)
    patch = (_XX >= x0) & (_XX <= x0 + w) & (_YY >= y0) & (_YY <= y0 + h)  # a patch, not the whole image
    cname = _color_name(rng)
    img = _finish(rng, _paint(_background(rng), m & patch, _jitter(rng, COLORS[cname])))
    word = TEXTURE_SYNONYMS[kind] if synonyms else kind
    return img, _pick(rng, [f"a {word} pattern", f"{cname} {word}", f"a patch of {word}", f"a photo of {word}"])


def _count(rng, synonyms: bool):
    n = int(rng.integers(1, 6))
    shape = ("square", "diamond")[rng.integers(2)]
    cname = _color_name(rng)
    color = _jitter(rng, COLORS[cname])
    img = _background(rng)
    centers: list[tuple[float, float]] = []
    while len(centers) < n:
        c = tuple(rng.uniform(4, SIZE - 4, 2))
        if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > 56 for a, b in centers):
            centers.append(c)
    for cx, cy in centers:
        img = _paint(img, shape_mask(shape, cx, cy, rng.uniform(2.5, 3.5)), color)
    if synonyms:
        forms = [f"{n} {cname} {shape}s", f"{n} small things", f"there are {n} objects", f"a picture of {n}"]
    else:
        word = NUMBER_WORDS[n]
        forms = [f"{word} {cname} {shape}s" if n > 1 else f"one {cname} {shape}", f"{word} small things",
                 f"there are {word} objects", f"a picture of {word}"]
    return _finish(rng, img), _pick(rng, forms)


def _orientation(rng, synonyms: bool):
    label = int(rng.integers(len(ORIENTATIONS)))
    name = ORIENTATIONS[label]
    angle = np.deg2rad(label * 45 + rng.uniform(-8, 8))
    cx, cy = rng.uniform(9, 23, 2)
    m = line_mask(cx, cy, angle, rng.uniform(5, 8), 2.6)  # shorter and thicker than the task's lines
    cname = _color_name(rng)
    img = _finish(rng, _paint(_background(rng), m, _jitter(rng, COLORS[cname])))
    word = ORIENTATION_SYNONYMS[name] if synonyms else name
    return img, _pick(rng, [f"a {word}", f"a {cname} {word}", f"a short {word}", f"a thick {word}"])


def _scene(rng, synonyms: bool):
    name = list(SCENES)[rng.integers(len(SCENES))]
    sky, ground = SCENES[name]
    horizon = rng.uniform(8, 24)  # flat, and no stars at night
    img = np.where((_YY < horizon)[..., None], _jitter(rng, sky, 60), _jitter(rng, ground, 60))
    if synonyms:
        w = SCENE_SYNONYMS[name]
        forms = [f"a photo of {w}", w, f"{w} far away", f"a picture of {w}"]
    else:
        forms = [f"a photo of a {name}", f"the {name}", f"a {name} far away", f"a picture of a {name}"]
    return _finish(rng, img.astype(np.float32), noise=25), _pick(rng, forms)


def _digit(rng, synonyms: bool):
    d = int(rng.integers(10))
    s = int(rng.integers(2, 4))  # 10 x 14 or 15 x 21 pixels, printed
    alpha = np.kron(GLYPHS[d], np.ones((s, s), np.float32))
    h, w = alpha.shape
    y0, x0 = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
    full = np.zeros((SIZE, SIZE), np.float32)
    full[y0 : y0 + h, x0 : x0 + w] = alpha
    cname = _color_name(rng)
    img = _background(rng) * (1 - full[..., None]) + _jitter(rng, COLORS[cname]) * full[..., None]
    if synonyms:
        forms = [f"the sign {d}", f"a printed {d}", f"a {cname} {d}", f"glyph {d}"]
    else:
        word = NUMBER_WORDS[d]
        forms = [f"the number {word}", f"a printed {word}", f"a {cname} number {word}", f"the digit {word}"]
    return _finish(rng, img), _pick(rng, forms)


_FAMILIES = (_texture, _count, _orientation, _scene, _digit)
_P = np.array([0.35] + [0.13] * 5)


def _mixed(synonyms: bool) -> Callable:
    def sample(rng: np.random.Generator) -> tuple[np.ndarray, str]:
        i = rng.choice(6, p=_P)
        return caption_sample(rng) if i == 0 else _FAMILIES[i - 1](rng, synonyms)

    return sample


WORLDS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, str]]] = {
    "shapes": caption_sample,
    "all_words": _mixed(synonyms=False),
    "synonyms": _mixed(synonyms=True),
}


def world(name: str) -> Callable[[np.random.Generator], tuple[np.ndarray, str]]:
    if name not in WORLDS:
        raise KeyError(f"unknown caption world {name!r}; known: {', '.join(WORLDS)}")
    return WORLDS[name]
