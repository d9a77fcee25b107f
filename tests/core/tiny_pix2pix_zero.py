"""diffusers' ``StableDiffusionPix2PixZeroPipeline`` on the tiny models (reference for the pix2pix-zero mode).

No text encoder: conditionings go in as ``prompt_embeds`` / ``negative_prompt_embeds`` and the edit
direction as ``target_embeds - source_embeds``. A one-level tiny VAE only gives ``invert`` its dtype and a
decoder for its (unused) image output; 4-channel "images" are taken as latents as they are.
"""

from __future__ import annotations

import torch

from .tiny import f64, sd_scheduler_config
from .tiny import tiny_vae as _tiny_vae


def tiny_vae(dtype: torch.dtype = torch.float64):
    """A one-level (x1) ``tiny.tiny_vae``: 4-channel "images" are the latents themselves."""
    return _tiny_vae(
        0,
        dtype,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
    )


def pix2pix_zero_pipeline(unet, prediction_type: str = "epsilon"):
    """The pipeline over ``unet`` (which it modifies: pass an untouched copy), schedulers in the UNet's dtype."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_variants.pipeline_stable_diffusion_pix2pix_zero import (
        StableDiffusionPix2PixZeroPipeline,
    )

    cfg = sd_scheduler_config(prediction_type)
    sched, inverse = DDIMScheduler.from_config(cfg), DDIMInverseScheduler.from_config(cfg)
    if unet.dtype == torch.float64:
        sched, inverse = f64(sched), f64(inverse)
    pipe = StableDiffusionPix2PixZeroPipeline(
        vae=tiny_vae(unet.dtype),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=sched,
        feature_extractor=None,
        safety_checker=None,
        inverse_scheduler=inverse,
        caption_generator=None,
        caption_processor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_edit(pipe, z_t, caption, delta, steps: int, cfg: float, weight: float, negative=None) -> torch.Tensor:
    """``pipe.__call__`` from the VP latent ``z_t``: CFG ``cfg`` against ``negative`` (default: the caption),
    edit = caption + ``delta`` (B, T, D), cross-attention guidance ``weight``. Returns the edited VP latent."""
    out = pipe(
        prompt_embeds=caption,
        negative_prompt_embeds=caption if negative is None else negative,
        source_embeds=torch.zeros_like(delta),
        target_embeds=delta,
        latents=z_t.clone(),
        num_inference_steps=steps,
        guidance_scale=cfg,
        cross_attention_guidance_amount=weight,
        output_type="latent",
    )
    return out.images
