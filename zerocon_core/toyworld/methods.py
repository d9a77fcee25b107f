"""The edit methods the quality table compares, run on one :class:`~.edits.EditCase` with a
``ZeroConPipeline`` over the toy model. Every method gets the source caption and the ideal edit's caption
(the direction is their prompt difference: the edit conditioning is the target caption's embedding).

- ``prompt-swap``: DDIM inversion, then CFG sampling under the target caption, no guidance;
- ``pix2pix-zero``: branches "pix2pix-zero", cross-attention only, raw step (pix2pix-zero's update);
- ``default``: cross-attention + PatchNCE, step mode auto (what the nodes and the CLI default to);
- ``xa-only`` / ``nce-only``: the default with one term's weight 0;
- ``diffuseit``: text-guided DiffuseIT (noised start, DINO structure + semantic divergence + range, CFG under
  the target caption) with a **random-weight** stand-in for DINO (no DINO weights exist here: its keys are a
  random projection of 4 x 4 patches, which keeps layout but knows no semantics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..diffusers_host.pipeline import EditOptions
from .edits import EditCase
from .world import render

METHODS: dict[str, dict[str, Any]] = {
    "prompt-swap": dict(xa_weight=0.0, nce_weight=0.0),
    "pix2pix-zero": dict(branches="pix2pix-zero", nce_weight=0.0),
    "default": {},
    "xa-only": dict(nce_weight=0.0),
    "nce-only": dict(xa_weight=0.0),
    "diffuseit": {},
}


@dataclass
class RunSettings:
    """What every method shares: DDIM ``steps``, ``cfg``, ``seed``; ``options``: extra ``EditOptions`` fields
    applied to every guided method (e.g. ``step_size``, ``nce_weight`` ratios for a sweep)."""

    steps: int = 20
    cfg: float = 5.0
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


def source_tensor(case: EditCase) -> torch.Tensor:
    """The drawn source as a (1, 3, H, W) float32 tensor in [0, 1]."""
    return torch.from_numpy(render(case.source)[0].transpose(2, 0, 1).copy())[None]


def edit_options(case: EditCase, method: str, run: RunSettings) -> EditOptions:
    """The pipeline options of ``method`` on ``case`` (``KeyError`` for an unknown method)."""
    extra = {**run.options, **METHODS[method]} if method != "prompt-swap" else dict(METHODS[method])
    return EditOptions(
        caption=case.source.caption,
        target_prompt=case.target.caption,
        steps=run.steps,
        cfg=run.cfg,
        seed=run.seed,
        **extra,
    )


def run_method(pipe: Any, case: EditCase, method: str, run: RunSettings) -> np.ndarray:
    """The edited (H, W, 3) image in [0, 1] of ``method`` on ``case``."""
    if method == "diffuseit":
        out = run_diffuseit(pipe, case, run)
    else:
        out = pipe.edit(source_tensor(case), edit_options(case, method, run), progress=False).image
    return out[0].permute(1, 2, 0).numpy()


def random_dino(seed: int = 0) -> Any:
    """The DINO stand-in: a seeded random ``ViTModel`` (patch 4, 32 px, 64 wide, 2 blocks), eval mode."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=4,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    return ViTModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)


_DINO: dict[int, Any] = {}


def run_diffuseit(pipe: Any, case: EditCase, run: RunSettings) -> torch.Tensor:
    """Text-guided DiffuseIT on ``case`` (see the module docstring); returns (1, 3, H, W) in [0, 1]."""
    from ..common.images import decode_latents, encode_latents
    from ..diffuseit.guidance import diffuseit_guidance, diffuseit_sample
    from ..diffusers_host.denoiser import TextCond
    from ..diffusers_host.pipeline import sampling_grid
    from ..method.sampler import SamplerSettings
    from ..method.schedule import vp_scale

    dino = _DINO.setdefault(run.seed, random_dino(run.seed))
    source = source_tensor(case)
    z0 = encode_latents(pipe.vae, source)
    src_embeds, _ = pipe.encode([case.source.caption])
    tgt_embeds, _ = pipe.encode([case.target.caption])

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return (pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample + 1) / 2

    terms = diffuseit_guidance(dino, decode, source, dino_size=32, dino_max_size=None)
    sigmas = sampling_grid(pipe.denoiser, run.steps)
    settings = SamplerSettings(cfg=run.cfg, seed=run.seed, resample=10, step_mode="raw")
    res = diffuseit_sample(
        pipe.denoiser,
        z0,
        sigmas,
        cond=TextCond(tgt_embeds),
        negative_cond=TextCond(src_embeds),
        guidance=terms,
        settings=settings,
    )
    return decode_latents(pipe.vae, res.latent * vp_scale(sigmas[-1]))


def run_batch(pipe: Any, cases: list[EditCase], method: str, run: RunSettings) -> np.ndarray:
    """The edited (N, H, W, 3) images of ``method`` on ``cases``, all in one batch: the same inversion and
    guided sampler as ``ZeroConPipeline.edit`` (``pipeline.invert_and_edit``), batched for speed."""
    if method == "diffuseit":
        return np.stack([run_method(pipe, c, method, run) for c in cases])
    from ..common.images import decode_latents, encode_latents
    from ..diffusers_host.denoiser import TextCond
    from ..diffusers_host.pipeline import invert_and_edit, options_guidance
    from ..method.inversion import NoiseRegularization

    opts = edit_options(cases[0], method, run)
    settings = opts.sampler_settings()
    guidance = options_guidance(pipe.prediction_type, opts, settings)
    z0 = encode_latents(pipe.vae, torch.cat([source_tensor(c) for c in cases]))
    src, _ = pipe.encode([c.source.caption for c in cases])
    tgt, _ = pipe.encode([c.target.caption for c in cases])
    z, _, _ = invert_and_edit(
        pipe.denoiser,
        z0,
        TextCond(src),
        TextCond(tgt),
        steps=opts.steps,
        guidance=guidance,
        settings=settings,
        regularization=NoiseRegularization() if opts.regularization else None,
        progress=False,
    )
    return decode_latents(pipe.vae, z).permute(0, 2, 3, 1).numpy()
