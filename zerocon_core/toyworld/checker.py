"""Read a toy-world image back from its pixels, no model needed: the object's mask (saturated pixels, largest
4-connected component), its colour (nearest palette colour of its mean), its shape (the best-fitting of the
three shapes inscribed in its bounding box), the background's kind (how much of its variance the row and
column profiles explain); and the structure scores of an edit (object IoU, background PSNR).

Exact on drawn scenes (tests/core/test_toyworld_checker.py); on generated images it is a reading with
thresholds, which is what the quality table reports.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np

from .world import COLOURS, IMAGE_SIZE, SHAPES

#: A pixel is object when max(RGB) - min(RGB) exceeds this (backgrounds are grey: 0).
SATURATION = 0.3
#: Fewer object pixels than this: no object.
MIN_PIXELS = 12
#: Background std below this: plain.
PLAIN_STD = 0.04
#: Share of the background's variance the row (stripes) or column (gradient) means must explain.
PROFILE_SHARE = 0.8


@dataclass(frozen=True)
class Reading:
    """What the checker reads in one image; ``colour`` / ``shape`` are None when no object is found."""

    colour: str | None
    shape: str | None
    background: str
    mask: np.ndarray


def _hwc(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) or (3, H, W) image, got {img.shape}")
    return img


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (all False when the mask is empty)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def object_mask(image: np.ndarray) -> np.ndarray:
    """The (H, W) boolean object mask: the largest component of the saturated pixels."""
    img = _hwc(image)
    return largest_component(img.max(-1) - img.min(-1) > SATURATION)


def read_colour(image: np.ndarray, mask: np.ndarray) -> str | None:
    """The palette colour nearest the mean colour under ``mask`` (None when the mask is too small)."""
    if mask.sum() < MIN_PIXELS:
        return None
    mean = _hwc(image)[mask].mean(0)
    return min(COLOURS, key=lambda c: float(((mean - np.array(COLOURS[c])) ** 2).sum()))


def _inscribed(shape: str, x0: int, y0: int, x1: int, y1: int, size: tuple[int, int]) -> np.ndarray:
    """``shape`` drawn to fill the pixel box [x0, x1] x [y0, y1] (inclusive)."""
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]] + 0.5
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    rx, ry = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
    if shape == "circle":
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    if shape == "square":
        return (xx >= x0) & (xx <= x1 + 1) & (yy >= y0) & (yy <= y1 + 1)
    half = (yy - y0) / (y1 + 1 - y0) * rx  # triangle, apex up
    return (yy >= y0) & (yy <= y1 + 1) & (np.abs(xx - cx) <= half)


def read_shape(mask: np.ndarray) -> str | None:
    """The shape whose inscribed drawing in the mask's bounding box overlaps it best (None: too small)."""
    if mask.sum() < MIN_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return max(SHAPES, key=lambda s: iou(mask, _inscribed(s, *box, mask.shape)))


def read_background(image: np.ndarray, mask: np.ndarray) -> str:
    """The background kind from the grey pixels outside ``mask`` (dilated by one pixel)."""
    grey = _hwc(image).mean(-1)
    keep = ~dilate(mask)
    values = np.where(keep, grey, np.nan)
    total = np.nanvar(values)
    if np.sqrt(total) < PLAIN_STD:
        return "plain"
    with warnings.catch_warnings():  # a row or column wholly under the object has no mean: NaN, left out
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = np.nanmean(values, axis=1, keepdims=True)
        cols = np.nanmean(values, axis=0, keepdims=True)
        row_share = 1 - np.nanvar(values - rows) / total
        col_share = 1 - np.nanvar(values - cols) / total
    if row_share > PROFILE_SHARE and row_share > col_share:
        return "stripes"
    if col_share > PROFILE_SHARE:
        return "gradient"
    return "noise"


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """``mask`` grown by ``steps`` pixels (4-neighbourhood)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def read(image: np.ndarray) -> Reading:
    """Everything the checker reads in one (H, W, 3) or (3, H, W) image in [0, 1]."""
    mask = object_mask(image)
    return Reading(read_colour(image, mask), read_shape(mask), read_background(image, mask), mask)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def background_psnr(source: np.ndarray, edited: np.ndarray, keep: np.ndarray) -> float:
    """PSNR (dB, peak 1) of ``edited`` against ``source`` over the pixels where ``keep`` is True."""
    diff = (_hwc(source) - _hwc(edited))[keep]
    mse = float((diff**2).mean()) if diff.size else 0.0
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


assert IMAGE_SIZE % 8 == 0
