"""Procedural 32x32 RGB images for the offline tiny_eight pool and the tiny CLIP's pretraining captions.

Everything is numpy and seeded, so a (task, split) always yields the same bytes.
"""

from __future__ import annotations

import numpy as np

SIZE = 32
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 220, 50),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "white": (240, 240, 240),
}
SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond"]
POSITIONS = {
    "top left": (9, 9),
    "top right": (23, 9),
    "bottom left": (9, 23),
    "bottom right": (23, 23),
    "center": (16, 16),
}


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.8 * r
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r
    if shape == "triangle":
        return (dy <= 0.8 * r) & (abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        t = max(r / 3, 1.0)
        return ((abs(dx) <= t) & (abs(dy) <= r)) | ((abs(dy) <= t) & (abs(dx) <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise KeyError(f"unknown shape {shape!r}; known: {SHAPES}")


def _jitter(rng: np.random.Generator, rgb, amount: int = 25) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(20, 110, 3).astype(np.float32)
    return np.broadcast_to(base, (SIZE, SIZE, 3)).copy()


def _finish(rng: np.random.Generator, img: np.ndarray, noise: float = 12.0) -> np.ndarray:
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _paint(img: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    img[mask] = rgb
    return img


def _random_color(rng: np.random.Generator, exclude: str | None = None) -> np.ndarray:
    names = [c for c in COLORS if c != exclude]
    return _jitter(rng, COLORS[names[rng.integers(len(names))]])


# --- one function per task: (rng, label) -> HxWx3 uint8 ---------------------------------------------------


def draw_shape(rng, label):
    shape = SHAPES[label]
    img = _background(rng)
    r = rng.uniform(6, 11)
    cx, cy = rng.uniform(r, SIZE - r, 2)
    return _finish(rng, _paint(img, shape_mask(shape, cx, cy, r), _random_color(rng)))


def draw_color(rng, label):
    name = list(COLORS)[label]
    img = _background(rng)
    r = rng.uniform(5, 10)
    cx, cy = rng.uniform(r, SIZE - r, 2)
    shape = SHAPES[rng.integers(len(SHAPES))]
    return _finish(rng, _paint(img, shape_mask(shape, cx, cy, r), _jitter(rng, COLORS[name], 35)))


def draw_position(rng, label):
    cx, cy = list(POSITIONS.values())[label]
    img = _background(rng)
    r = rng.uniform(3.5, 5.5)
    cx, cy = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
    shape = SHAPES[rng.integers(len(SHAPES))]
    return _finish(rng, _paint(img, shape_mask(shape, cx, cy, r), _random_color(rng)))


def draw_count(rng, label):
    n = label + 1
    img = _background(rng)
    color = _random_color(rng)
    centers: list[tuple[float, float]] = []
    while len(centers) < n:
        c = tuple(rng.uniform(4, SIZE - 4, 2))
        if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > 49 for a, b in centers):
            centers.append(c)
    for cx, cy in centers:
        img = _paint(img, shape_mask("circle", cx, cy, rng.uniform(2.0, 3.0)), color)
    return _finish(rng, img)


TEXTURES = ["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots", "speckles"]


def texture_mask(rng, kind: str, p: float, ph: float, diagonal: int = 1, dot_radius: float = 0.25,
                 speckle: float = 0.3) -> np.ndarray:
    """Where a texture of period p (phase ph) is painted; `diagonal` +1 / -1 picks the stripes' direction,
    `dot_radius` the polka dots' radius as a fraction of p, `speckle` the density of speckles."""
    x, y = _XX + ph, _YY + ph
    if kind == "horizontal stripes":
        return (y % p) < p / 2
    if kind == "vertical stripes":
        return (x % p) < p / 2
    if kind == "diagonal stripes":
        return ((x + diagonal * y) % p) < p / 2
    if kind == "checkerboard":
        return ((x // (p / 1.5)) + (y // (p / 1.5))) % 2 == 0
    if kind == "polka dots":
        return ((x % p) - p / 2) ** 2 + ((y % p) - p / 2) ** 2 < (dot_radius * p) ** 2
    if kind == "speckles":
        return rng.random((SIZE, SIZE)) < speckle
    raise KeyError(f"unknown texture {kind!r}; known: {TEXTURES}")


def draw_texture(rng, label):
    p = rng.uniform(5, 9)
    m = texture_mask(rng, TEXTURES[label], p, rng.uniform(0, p))
    img = _background(rng)
    return _finish(rng, _paint(img, m, _random_color(rng)))


ORIENTATIONS = ["horizontal line", "rising diagonal line", "vertical line", "falling diagonal line"]


def line_mask(cx: float, cy: float, angle: float, half_length: float, half_width: float) -> np.ndarray:
    """A bar through (cx, cy) at `angle` radians (0: horizontal, counter-clockwise on screen)."""
    dx, dy = _XX - cx, _YY - cy
    along = dx * np.cos(angle) - dy * np.sin(angle)
    across = dx * np.sin(angle) + dy * np.cos(angle)
    return (abs(along) <= half_length) & (abs(across) <= half_width)


def draw_orientation(rng, label):
    angle = np.deg2rad(label * 45 + rng.uniform(-12, 12))
    cx, cy = rng.uniform(11, 21, 2)
    m = line_mask(cx, cy, angle, rng.uniform(8, 12), 1.6)
    return _finish(rng, _paint(_background(rng), m, _random_color(rng)))


SCENES = {  # sky colour, ground colour
    "beach": ((135, 200, 240), (225, 200, 130)),
    "forest": ((110, 170, 230), (30, 100, 40)),
    "ocean": ((150, 200, 235), (20, 60, 150)),
    "desert": ((240, 200, 140), (200, 120, 50)),
    "snowfield": ((170, 175, 185), (245, 245, 250)),
    "night sky": ((15, 20, 50), (10, 10, 15)),
}


def draw_scene(rng, label):
    sky, ground = list(SCENES.values())[label]
    horizon = rng.uniform(10, 22) + (_XX - 16) * rng.uniform(-0.3, 0.3)
    img = np.where((_YY < horizon)[..., None], _jitter(rng, sky, 40), _jitter(rng, ground, 40))
    if label == 5:  # stars
        stars = (rng.random((SIZE, SIZE)) < 0.04) & (_YY < horizon)
        img[stars] = 230
    return _finish(rng, img.astype(np.float32), noise=18)


_DIGITS: tuple[np.ndarray, np.ndarray] | None = None


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits that ship inside scikit-learn (no download)."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.images.astype(np.float32) / 16.0, d.target.astype(np.int64))
    return _DIGITS


def draw_digit(rng, glyph: np.ndarray) -> np.ndarray:
    """Upsample an 8x8 sklearn digit x4 to the whole 32x32 canvas, in a random colour on a random background."""
    alpha = np.kron(glyph, np.ones((4, 4), np.float32))[..., None]
    img = _background(rng) * (1 - alpha) + _random_color(rng) * alpha
    return _finish(rng, img)


def caption_sample(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One pretraining pair: a coloured shape somewhere, and a caption naming some of its attributes."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    cname = list(COLORS)[rng.integers(len(COLORS))]
    pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
    big = rng.random() < 0.5
    r = rng.uniform(7, 10) if big else rng.uniform(3.5, 5.5)
    cx, cy = np.asarray(POSITIONS[pos]) + rng.uniform(-3, 3, 2)
    cx, cy = np.clip([cx, cy], r, SIZE - r)
    img = _finish(rng, _paint(_background(rng), shape_mask(shape, cx, cy, r), _jitter(rng, COLORS[cname])))
    size = "large" if big else "small"
    forms = [
        f"a {cname} {shape}",
        f"a photo of a {size} {cname} {shape}",
        f"a {shape} in the {pos}",
        f"a {size} {shape}",
        f"something {cname} in the {pos}",
        f"a {size} {cname} {shape} in the {pos}",
    ]
    return img, forms[rng.integers(len(forms))]

