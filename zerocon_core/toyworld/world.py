"""Procedural scenes: one saturated shape (circle, square, triangle) in one of four colours, at a position and
size, on a grey background (plain, striped, gradient, noisy), with its exact object mask and a caption such as
"a red circle on a striped background". Scenes are drawn with hard edges at :data:`IMAGE_SIZE` px and are fully
determined by their :class:`Scene` (seeded, reproducible).

Backgrounds are grey (equal R, G, B) and objects saturated, so an object's pixels are told from the background's
by their saturation: what makes :mod:`.checker` exact on drawn scenes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

#: Side of every scene, in pixels (a multiple of 8, as the pipeline wants).
IMAGE_SIZE = 32
#: Object colours (RGB in [0, 1]); saturated, far from each other and from grey.
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.9, 0.85, 0.1),
}
SHAPES = ("circle", "square", "triangle")
#: Background kinds and the caption word for each.
BACKGROUNDS = {"plain": "plain", "stripes": "striped", "gradient": "gradient", "noise": "noisy"}
#: Object radius range in pixels (half the bounding box side).
RADIUS = (5.0, 9.0)
_NOISE_GRID = 6


@dataclass(frozen=True)
class Scene:
    """Everything that decides a drawing. ``cx, cy, r``: the object's centre and radius in pixels;
    ``grey``: the background's two grey levels; ``period``/``phase``: stripes; ``noise_seed``: the noise
    texture; ``flip``: a gradient dark-to-light (False) or light-to-dark (True), left to right."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    r: float
    grey: tuple[float, float] = (0.3, 0.7)
    period: int = 6
    phase: int = 0
    flip: bool = False
    noise_seed: int = 0

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    def replace(self, **changes) -> Scene:
        """This scene with some attributes changed (e.g. ``colour="blue"``): what an ideal edit draws."""
        return dataclasses.replace(self, **changes)


def caption(colour: str, shape: str, background: str) -> str:
    """The caption of a scene with these attributes, e.g. "a red circle on a striped background"."""
    return f"a {colour} {shape} on a {BACKGROUNDS[background]} background"


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene with every attribute drawn uniformly from ``rng`` (object fully inside the image)."""
    r = float(rng.uniform(*RADIUS))
    lo, hi = r + 1.0, IMAGE_SIZE - r - 1.0
    g0 = float(rng.uniform(0.15, 0.45))
    return Scene(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        background=str(rng.choice(list(BACKGROUNDS))),
        cx=float(rng.uniform(lo, hi)),
        cy=float(rng.uniform(lo, hi)),
        r=r,
        grey=(g0, float(g0 + rng.uniform(0.3, 0.45))),
        period=int(rng.integers(3, 6)),
        phase=int(rng.integers(0, 8)),
        flip=bool(rng.integers(0, 2)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def scenes(seed: int, count: int) -> list[Scene]:
    """``count`` random scenes from one seeded generator (the same list for the same arguments)."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)  # x varies along columns, y along rows


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """The (H, W) boolean mask of ``shape`` centred at ``(cx, cy)`` with radius ``r`` (pixel centres inside)."""
    x, y = _grid()
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        s = 0.85 * r
        return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    if shape == "triangle":  # apex up, base at cy + 0.8 r, half-width r at the base
        top, bottom = cy - r, cy + 0.8 * r
        half = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def background_image(scene: Scene) -> np.ndarray:
    """The (H, W) grey background of ``scene`` in [0, 1]."""
    lo, hi = scene.grey
    x, y = _grid()
    if scene.background == "plain":
        return np.full((IMAGE_SIZE, IMAGE_SIZE), (lo + hi) / 2)
    if scene.background == "stripes":  # horizontal bands: varies along y only
        band = ((np.floor(y) + scene.phase) // scene.period) % 2
        return np.where(band > 0, hi, lo)
    if scene.background == "gradient":  # left to right: varies along x only
        t = x / IMAGE_SIZE
        return lo + (hi - lo) * ((1 - t) if scene.flip else t)
    if scene.background == "noise":
        return _noise(scene.noise_seed, lo, hi)
    raise ValueError(f"unknown background {scene.background!r}; expected one of {tuple(BACKGROUNDS)}")


def _noise(seed: int, lo: float, hi: float) -> np.ndarray:
    """A smooth random grey field: a coarse random grid, bilinearly upsampled."""
    g = np.random.default_rng(seed).uniform(lo, hi, size=(_NOISE_GRID, _NOISE_GRID))
    pos = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE * (_NOISE_GRID - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, _NOISE_GRID - 2)
    f = pos - i0
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)``: the (H, W, 3) float32 RGB image in [0, 1] and the (H, W) boolean object mask."""
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.r)
    image = np.repeat(background_image(scene)[..., None], 3, axis=-1)
    image[mask] = COLOURS[scene.colour]
    return image.astype(np.float32), mask


def render_batch(batch: list[Scene]) -> np.ndarray:
    """The (N, 3, H, W) float32 images of ``batch`` (channels first, as the models take them)."""
    return np.stack([render(s)[0].transpose(2, 0, 1) for s in batch])
