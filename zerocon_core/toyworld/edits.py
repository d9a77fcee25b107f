"""The held-out edit set and its scoring, from the world's truth.

An :class:`EditCase` is a drawn source scene and the scene an ideal edit would draw: one attribute changed
(colour, shape or background), everything else (position, size, the other attributes, the background's
pattern) kept. :func:`score` reads the edited image with the checker: whether the asked change happened, whether
the rest was kept, the object's IoU against the ideal edit's mask, and the background's PSNR against the source
outside both objects (colour and shape swaps; a background swap changes the background by design).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import checker
from .world import BACKGROUNDS, COLOURS, SHAPES, Scene, render, scenes

#: Edit kinds and the Scene attribute each changes.
KINDS = {"colour": "colour", "shape": "shape", "background": "background"}
_CHOICES = {"colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(BACKGROUNDS)}
#: Seed of the held-out edit set (training scenes use seed 0; bench/toyworld_train.py).
HELD_OUT_SEED = 2026


@dataclass(frozen=True)
class EditCase:
    """One edit: ``source`` drawn, ``target`` what the ideal edit draws; ``kind`` names the changed attribute."""

    index: int
    kind: str
    source: Scene
    target: Scene

    @property
    def asked(self) -> str:
        return getattr(self.target, KINDS[self.kind])


def edit_set(count: int, seed: int = HELD_OUT_SEED, kinds: tuple[str, ...] = tuple(KINDS)) -> list[EditCase]:
    """``count`` edits cycling through ``kinds``; each target value is drawn among the values that differ from
    the source's (seeded: the same list for the same arguments)."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for i, src in enumerate(scenes(seed, count)):
        kind = kinds[i % len(kinds)]
        attr = KINDS[kind]
        options = [v for v in _CHOICES[kind] if v != getattr(src, attr)]
        out.append(EditCase(i, kind, src, src.replace(**{attr: str(rng.choice(options))})))
    return out


def score(case: EditCase, edited: np.ndarray) -> dict[str, float]:
    """Scores of one edited (H, W, 3) image in [0, 1]: ``success`` (1 if the checker reads the asked value),
    ``kept`` (1 if it reads the other two attributes unchanged), ``iou`` (object mask vs the ideal edit's),
    ``bg_psnr`` (dB outside both objects, dilated by one pixel; NaN for background swaps)."""
    reading = checker.read(edited)
    values = {"colour": reading.colour, "shape": reading.shape, "background": reading.background}
    src_img, src_mask = render(case.source)
    _, tgt_mask = render(case.target)
    others = [k for k in KINDS if k != case.kind]
    psnr = math.nan
    if case.kind != "background":
        keep = ~checker.dilate(src_mask | tgt_mask)
        psnr = checker.background_psnr(src_img, edited, keep)
    return {
        "success": float(values[case.kind] == case.asked),
        "kept": float(all(values[k] == getattr(case.source, KINDS[k]) for k in others)),
        "iou": checker.iou(reading.mask, tgt_mask),
        "bg_psnr": psnr,
    }


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    """Means of the scores (NaN PSNRs, i.e. background swaps, left out of ``bg_psnr``); ``n`` edits."""

    def mean(key: str) -> float:
        vals = [r[key] for r in rows if not math.isnan(r[key])]
        return float(np.mean(vals)) if vals else math.nan

    return {"n": float(len(rows)), **{k: mean(k) for k in ("success", "kept", "iou", "bg_psnr")}}
