"""BLIP image captioning (the source prompt of pix2pix-zero / zeroCon; docs/method.md §4).

Weights are loaded only from a local folder in transformers ``save_pretrained`` layout (e.g.
``ComfyUI/models/blip/blip-image-captioning-base``); nothing is downloaded here. transformers is imported
lazily, so importing this module is cheap.

Decoding defaults follow pix2pix-zero (beam search, 3 beams, at most 30 tokens) with diffusers' prefix
"a photography of" (LAVIS used "a picture of " with a minimum length of 10); the prefix is stripped from
the returned captions by default. An empty caption raises ``ValueError`` (a blank source prompt would
silently give a meaningless edit), unless ``allow_empty=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..common.legacy_args import merge_settings
from ..common.loaded_model import OnModelDevice
from ..common.log import logger
from ..common.model_folders import WEIGHTS, ModelFolder, check_model_folder

__all__ = ["BLIP_FOLDER", "BLIP_MODEL_ID", "Blip", "CaptionSettings", "caption", "check_blip_folder", "load_blip"]

BLIP_MODEL_ID = "Salesforce/blip-image-captioning-base"

BLIP_FOLDER = ModelFolder(
    kind="BLIP captioning model",
    model_id=BLIP_MODEL_ID,
    required=(
        ("config.json",),
        WEIGHTS,
        ("tokenizer.json", "vocab.txt"),
        ("preprocessor_config.json", "processor_config.json"),
    ),
    saved_by="BlipForConditionalGeneration and BlipProcessor",
)


@dataclass
class Blip(OnModelDevice):
    """A loaded BLIP captioner: ``BlipForConditionalGeneration`` + ``BlipProcessor`` and where they came from."""

    model: Any
    processor: Any
    folder: str


def check_blip_folder(folder: str | os.PathLike, model_id: str | None = None) -> None:
    """Raise ``FileNotFoundError`` naming ``folder`` and the model id when the folder is missing or incomplete."""
    check_model_folder(folder, BLIP_FOLDER, model_id)


def load_blip(
    folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Blip:
    """Load BLIP from a local folder (``local_files_only=True``; never reaches the Hub), in eval mode."""
    folder = os.fspath(folder)
    check_blip_folder(folder)
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    logger.info("loaded BLIP from %s (%s, %s)", folder, device, dtype)
    return Blip(model=model, processor=processor, folder=folder)


def _to_pil(images) -> list:
    """PIL images, or a ``(B, H, W, 3)`` / ``(H, W, 3)`` float tensor in [0, 1] (ComfyUI IMAGE) -> RGB PIL list."""
    from PIL import Image

    if isinstance(images, Tensor):
        t = images if images.ndim == 4 else images[None]
        if t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image tensor must be (B, H, W, C) in [0, 1], got {tuple(images.shape)}")
        arr = (t[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        if arr.shape[-1] == 1:
            arr = arr.repeat(3, axis=-1)
        return [Image.fromarray(a) for a in arr]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Tensor):
            out.extend(_to_pil(im))
        elif isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
        else:
            raise TypeError(f"image {i} is a {type(im).__name__}; expected a PIL image or a tensor")
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class CaptionSettings:
    """How BLIP decodes: conditioned on ``prefix`` (empty = unconditional; removed from the result with
    ``strip_prefix``), beam search with ``num_beams``, between ``min_new_tokens`` and ``max_new_tokens`` new
    tokens, ``batch_size`` images per ``generate`` call; ``allow_empty`` lets an empty caption through."""

    prefix: str = "a photography of"
    max_new_tokens: int = 30
    num_beams: int = 3
    strip_prefix: bool = True
    batch_size: int = 8
    min_new_tokens: int = 0
    allow_empty: bool = False


def _generate(blip: Blip, pil: list, prefix: str, s: CaptionSettings) -> list[str]:
    """Raw decoded BLIP outputs for ``pil``, ``s.batch_size`` images at a time."""
    model, processor = blip.model, blip.processor
    out: list[str] = []
    for i in range(0, len(pil), s.batch_size):
        chunk = pil[i : i + s.batch_size]
        if prefix:
            inputs = processor(images=chunk, text=[prefix] * len(chunk), return_tensors="pt")
        else:
            inputs = processor(images=chunk, return_tensors="pt")
        kwargs = {"pixel_values": inputs["pixel_values"].to(device=blip.device, dtype=blip.dtype)}
        if prefix:
            kwargs["input_ids"] = inputs["input_ids"].to(blip.device)
            kwargs["attention_mask"] = inputs["attention_mask"].to(blip.device)
        with torch.no_grad():
            ids = model.generate(
                **kwargs, max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens, num_beams=s.num_beams
            )
        out.extend(processor.batch_decode(ids, skip_special_tokens=True))
    return out


def caption(
    blip: Blip, images: Tensor | Sequence, *args: Any, settings: CaptionSettings | None = None, **kwargs: Any
) -> list[str]:
    """Caption each image; returns one string per image, in order.

    ``images``: list of PIL images, or a ``(B, H, W, 3)`` tensor in [0, 1]. ``settings``: see
    ``CaptionSettings``; its fields are also accepted as the old keywords (``prefix=...``) or positionally.
    Raises ``ValueError`` naming the images whose caption came out empty, unless ``allow_empty``.
    """
    s = merge_settings(CaptionSettings, settings, args, kwargs, "caption")
    pil = _to_pil(images)
    if not pil:
        raise ValueError("caption() got no images")
    prefix = " ".join(s.prefix.split())
    out = _generate(blip, pil, prefix, s)
    norm_prefix = _norm(prefix)
    captions = []
    for text in out:
        text = " ".join(text.split())
        if s.strip_prefix and norm_prefix and _norm(text).startswith(norm_prefix):
            text = text[len(norm_prefix) :].strip()
        captions.append(text)
    empty = [i for i, c in enumerate(captions) if not c]
    if empty and not s.allow_empty:
        raise ValueError(
            f"BLIP returned an empty caption for image(s) {empty} (prefix {prefix!r}): type the source prompt "
            "by hand, change the prefix, or raise the minimum caption length"
        )
    logger.debug("BLIP captions: %s", captions)
    return captions
