"""PIE-Bench (Ju et al., "PnP Inversion", ICLR 2024): its annotation file, its edit masks and its table's metrics.

**Annotation file** (``mapping_file.json``, as distributed with the benchmark): one JSON object mapping each
key (``"000000000000"``) to an entry with ``image_path`` (relative to the ``annotation_images`` folder),
``original_prompt`` and ``editing_prompt`` (square brackets mark the words that differ; they are removed
before use, as PIE-Bench's scripts do), ``editing_instruction``, ``editing_type_id`` ("0" ... "9"),
``blended_word`` (two words, the edited object in each prompt) and ``mask``.

**Mask** (run-length encoded): a flat list ``[start_0, length_0, start_1, length_1, ...]`` of runs of edited
pixels; ``start`` is a 0-based index into the image flattened row by row (pixel ``(row, col)`` is
``row * width + col``; the benchmark's images are 512 x 512) and a run that would pass the last pixel stops
there. After decoding, PIE-Bench marks the one-pixel border of the image as edited too ("to avoid annotation
errors in boundary"); ``decode_mask`` does the same unless ``border=False``. 1 / True = edited region; the
background ("unedit part") is the rest.

**Metrics** (``score_pair``), in the units of PIE-Bench's table (names in ``METRICS``, headers in ``HEADERS``):

- ``structure_distance_x1e3``: DINO ViT-B/8 key self-similarity distance of the whole images x 10^3, fed
  0..255 pixel values as PIE-Bench's code does (``metrics.structure_distance(pixel_scale=255)``);
- ``psnr``, ``mse_x1e4`` (x 10^4), ``ssim_x1e2`` (x 10^2), ``lpips_x1e3`` (x 10^3): both images multiplied
  by the background and the whole frame scored (``metrics.piebench_background_metrics``; LPIPS with the
  SqueezeNet trunk, ``lpips.py``, only when a weights folder is given, else NaN);
- ``clip_whole``: CLIP score (``100 * max(cos, 0)``, ``openai/clip-vit-large-patch14``) of the edited image
  with the editing prompt; ``clip_edited``: the same with the pixels outside the edit mask set to black.

A row whose mask leaves no background (or no edited region, for ``clip_edited``) gets NaN there, as
PIE-Bench's "nan".

**Edited images**: PnPInversion's layout, one folder per method holding each edit at the entry's
``image_path`` (``<folder>/0_random_140/000000000000.jpg``), or at that path with a ``.png`` suffix (what
``bench/sweep.py --piebench`` writes). An edited file that is not square is PnPInversion's side-by-side
strip (instruction, source, reconstruction, edit): its bottom-right block of the source's size is the edit,
as in PIE-Bench's evaluation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from . import metrics as zm

__all__ = [
    "HEADERS",
    "IMAGE_SIZE",
    "METRICS",
    "PieBenchRow",
    "check_rle",
    "decode_mask",
    "edited_candidates",
    "find_edited",
    "read_mapping",
    "score_pair",
    "strip_brackets",
    "take_edit_panel",
]

#: PIE-Bench's image (and mask) size, height x width
IMAGE_SIZE = (512, 512)
REQUIRED = ("image_path", "original_prompt", "editing_prompt", "mask")
#: the table's columns, in PIE-Bench's units
METRICS = ("structure_distance_x1e3", "psnr", "lpips_x1e3", "mse_x1e4", "ssim_x1e2", "clip_whole", "clip_edited")
HEADERS = {
    "structure_distance_x1e3": "Structure distance x1e3",
    "psnr": "PSNR",
    "lpips_x1e3": "LPIPS x1e3",
    "mse_x1e4": "MSE x1e4",
    "ssim_x1e2": "SSIM x1e2",
    "clip_whole": "CLIP Whole",
    "clip_edited": "CLIP Edited",
}


@dataclass(frozen=True)
class PieBenchRow:
    """One annotation entry; prompts without their square brackets, ``mask`` still run-length encoded."""

    key: str
    image_path: str
    original_prompt: str
    editing_prompt: str
    editing_instruction: str
    editing_type_id: str
    blended_word: tuple[str, ...]
    mask: tuple[int, ...]


def strip_brackets(text: str) -> str:
    """``"a [rusty] bike"`` -> ``"a rusty bike"`` (PIE-Bench's prompts mark the edited words with brackets)."""
    return text.replace("[", "").replace("]", "")


def check_rle(rle: Any, where: str) -> tuple[int, ...]:
    """Check the structure of a run-length encoded mask (a list of an even number of non-negative integers)
    and return it as a tuple; ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(rle, (list, tuple)):
        raise ValueError(
            f"{where}: the mask must be a list [start, length, start, length, ...], got {type(rle).__name__}"
        )
    bad = [v for v in rle if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ValueError(f"{where}: the mask must hold non-negative integers, got {bad[0]!r}")
    if len(rle) % 2:
        raise ValueError(f"{where}: the mask has {len(rle)} numbers; it needs (start, length) pairs, an even count")
    return tuple(int(v) for v in rle)


def decode_mask(
    rle: Sequence[int], height: int = IMAGE_SIZE[0], width: int = IMAGE_SIZE[1], border: bool = True
) -> np.ndarray:
    """PIE-Bench's run-length decoding: ``(height, width)`` bool array, True = edited (see the module docstring).

    ``border`` also marks the one-pixel frame as edited, as PIE-Bench does. ``ValueError`` when a run starts
    past the last pixel (a mask encoded for another image size) or the list is malformed."""
    runs = np.asarray(check_rle(rle, "mask"), dtype=np.int64).reshape(-1, 2)
    n = height * width
    flat = np.zeros(n, dtype=bool)
    for k, (start, length) in enumerate(runs):
        if start >= n:
            raise ValueError(
                f"mask run {k} starts at pixel {start}, past the last pixel of a {width}x{height} image ({n - 1}): "
                "the mask was encoded for another image size"
            )
        flat[start : start + length] = True
    mask = flat.reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


def read_mapping(path: str | os.PathLike, categories: Sequence[str] | None = None) -> list[PieBenchRow]:
    """Read PIE-Bench's ``mapping_file.json`` (only the ``editing_type_id`` values in ``categories``, when given).

    Raises ``FileNotFoundError`` and ``ValueError`` (not JSON, not an object of entries, a missing field, a
    malformed mask, no entry left) naming the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PIE-Bench annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object mapping each key to its annotation (PIE-Bench's mapping_file.json), "
            f"got a {type(data).__name__}"
        )
    wanted = None if categories is None else {str(c) for c in categories}
    rows = []
    for key, item in data.items():
        where = f"{path}, entry {key!r}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got a {type(item).__name__}")
        missing = [f for f in REQUIRED if f not in item]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        for f in ("image_path", "original_prompt", "editing_prompt"):
            if not isinstance(item[f], str):
                raise ValueError(f"{where}: {f} must be a string, got {type(item[f]).__name__}")
        row = PieBenchRow(
            key=str(key),
            image_path=item["image_path"],
            original_prompt=strip_brackets(item["original_prompt"]),
            editing_prompt=strip_brackets(item["editing_prompt"]),
            editing_instruction=str(item.get("editing_instruction", "")),
            editing_type_id=str(item.get("editing_type_id", "")),
            blended_word=tuple(str(item.get("blended_word", "")).split()),
            mask=check_rle(item["mask"], where),
        )
        if wanted is None or row.editing_type_id in wanted:
            rows.append(row)
    if not rows:
        which = "" if wanted is None else f" of editing type(s) {sorted(wanted)}"
        raise ValueError(f"{path}: no entry{which}")
    return rows


def edited_candidates(folder: str | os.PathLike, row: PieBenchRow) -> list[Path]:
    """Where an edit of ``row`` may be in a method's ``folder``, in the order they are tried."""
    first = Path(folder) / row.image_path
    return [first] if first.suffix.lower() == ".png" else [first, first.with_suffix(".png")]


def find_edited(folder: str | os.PathLike, row: PieBenchRow) -> Path | None:
    """The first existing file of ``edited_candidates``, or None."""
    return next((p for p in edited_candidates(folder, row) if p.is_file()), None)


def take_edit_panel(edited: Tensor, height: int, width: int) -> Tensor:
    """A non-square ``edited`` ``(1, 3, H, W)`` at least ``height`` x ``width`` is PnPInversion's side-by-side
    strip: its bottom-right ``height`` x ``width`` block. Anything else is returned unchanged."""
    h, w = edited.shape[-2:]
    if h != w and h >= height and w >= width and (h, w) != (height, width):
        return edited[..., h - height :, w - width :]
    return edited


def score_pair(
    source: Tensor,
    edited: Tensor,
    mask: Tensor | np.ndarray,
    editing_prompt: str,
    clip: Any = None,
    dino: Any = None,
    lpips: Any = None,
) -> dict[str, float]:
    """PIE-Bench's metrics of one edit, in its table's units (``METRICS``; see the module docstring).

    ``source``, ``edited``: ``(1, 3, H, W)`` in [0, 1]; ``mask``: ``(H, W)``, True / > 0 = edited region.
    Metrics whose model is not given (``clip``, ``dino``, ``lpips``) are NaN."""
    mask_t = torch.as_tensor(np.asarray(mask)).to(torch.float32)
    source, edited = zm.align_pair(source, edited)
    nan = math.nan
    out = dict.fromkeys(METRICS, nan)
    if dino is not None:
        out["structure_distance_x1e3"] = 1e3 * float(zm.structure_distance(dino, source, edited, pixel_scale=255)[0])
    bg = zm.piebench_background_metrics(source, edited, mask_t)
    out["psnr"] = float(bg["psnr"][0])
    out["mse_x1e4"] = 1e4 * float(bg["mse"][0])
    out["ssim_x1e2"] = 1e2 * float(bg["ssim"][0])
    if lpips is not None and math.isfinite(out["mse_x1e4"]):
        from .lpips import lpips_distance

        keep = (mask_t == 0).to(source.dtype)
        out["lpips_x1e3"] = 1e3 * float(lpips_distance(lpips, source * keep, edited * keep)[0])
    if clip is not None:
        out["clip_whole"] = float(zm.clip_score(clip, edited, editing_prompt)[0])
        out["clip_edited"] = float(zm.clip_edited_region(clip, edited, editing_prompt, mask_t)[0])
    return out
