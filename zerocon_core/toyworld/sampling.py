"""Text-to-image sampling with the toy model (plain DDIM + classifier-free guidance, diffusers' scheduler)
and the sample-quality reading: how often a generated image shows the captioned colour, shape and
background, read by the checker.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import checker
from .world import BACKGROUNDS, COLOURS, SHAPES, caption


@dataclass
class SampleSettings:
    """``per_caption`` images for each of the 48 captions, ``steps`` DDIM steps, CFG ``cfg``, seeded."""

    per_caption: int = 2
    steps: int = 25
    cfg: float = 4.0
    seed: int = 0


def all_captions() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) of the world."""
    return list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))


@torch.no_grad()
def generate(parts: Any, prompts: list[str], settings: SampleSettings, seed: int) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for ``prompts`` from ``parts`` (``sd_models.SDParts``)."""
    from diffusers import DDIMScheduler

    from ..common.images import decode_latents
    from ..text.direction import clip_encoder

    encode = clip_encoder(parts.tokenizer, parts.text_encoder)
    cond, _ = encode(prompts)
    uncond, _ = encode([""] * len(prompts))
    sched = DDIMScheduler.from_config(parts.scheduler_config)
    sched.set_timesteps(settings.steps)
    size = int(parts.unet.config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(prompts), int(parts.unet.config.in_channels), size, size, generator=gen)
    for t in sched.timesteps:
        eps = parts.unet(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample
        e_u, e_c = eps.chunk(2)
        z = sched.step(e_u + settings.cfg * (e_c - e_u), t, z).prev_sample
    return decode_latents(parts.vae, z)


def sample_quality(parts: Any, settings: SampleSettings) -> dict[str, float]:
    """Rates (0..1) at which generated images show the captioned colour, shape, background, and all three."""
    combos = all_captions() * settings.per_caption
    hits = {"colour": [], "shape": [], "background": [], "all": []}
    for i in range(0, len(combos), 48):
        chunk = combos[i : i + 48]
        images = generate(parts, [caption(*c) for c in chunk], settings, settings.seed + i)
        for (col, shp, bg), img in zip(chunk, images):
            r = checker.read(img.permute(1, 2, 0).numpy())
            ok = (r.colour == col, r.shape == shp, r.background == bg)
            for key, v in zip(("colour", "shape", "background"), ok):
                hits[key].append(v)
            hits["all"].append(all(ok))
    return {k: float(np.mean(v)) for k, v in hits.items()} | {"n": float(len(combos))}


assert len(SHAPES) * len(COLOURS) * len(BACKGROUNDS) == 48
