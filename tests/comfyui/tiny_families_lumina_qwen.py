"""Tiny Qwen-Image models built from ComfyUI's own classes (``comfy.supported_models.QwenImage`` ->
``model_base.QwenImage`` -> ``QwenImageTransformer2DModel``), for the 2026 family tests.

Every builder returns None on a ComfyUI without the class (feature detection): the tests skip with the reason.
"""

from __future__ import annotations

import tiny_models as tm
import torch

#: Text-encoder width of the tiny Qwen-Image (the real one: 3584, Qwen2.5-VL 7B's hidden size); not the tiny
#: Z-Image's (64), as the real widths differ.
QWEN_CONTEXT_DIM = 48
#: Head size 16 split over RoPE axes (frame, row, column), as the real model's 128 = 16 + 56 + 56.
QWEN_AXES = (4, 6, 6)


def qwen_image_config(layers: int = 2) -> dict:
    """The tiny network's ``unet_config``: 2 heads of 16, ``layers`` double-stream blocks, patch 2, 16 channels."""
    return {
        "image_model": "qwen_image",
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": layers,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": QWEN_CONTEXT_DIM,
        "axes_dims_rope": QWEN_AXES,
        "dtype": torch.float32,
    }


def has_qwen_image() -> bool:
    """Whether this ComfyUI has the 2026 Qwen-Image: its model config class and the torch-path switch
    (``model_management.in_training``) that came with its masked, comfy-kitchen-RoPE attention (0.3.64's Qwen-Image
    has neither the switch nor the text mask)."""
    import comfy.model_management
    import comfy.supported_models

    return hasattr(comfy.supported_models, "QwenImage") and hasattr(comfy.model_management, "in_training")


def qwen_image(seed: int = 21, layers: int = 2):
    """A tiny Qwen-Image MODEL (``QwenImage`` config, 16-channel Wan-2.1 latent format, flow matching)."""
    import comfy.supported_models

    return tm._dit_patcher(comfy.supported_models.QwenImage(qwen_image_config(layers)), seed)


def qwen_conditioning(seed: int, tokens: int = 12, batch: int = 1, padded: int = 0, reference=None):
    """A fake Qwen-Image CONDITIONING ``[[cond (batch, tokens, 64), {}]]``; with ``padded`` > 0 the last
    ``padded`` tokens are padding, marked by an ``attention_mask`` (1 keep, 0 pad) as ComfyUI's encoder sets it;
    ``reference``: a (B, 16, 1, h, w) latent in ``reference_latents``, as Qwen-Image-Edit's TextEncodeQwenImageEdit /
    ReferenceLatent set it."""
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    if padded:
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[:, tokens - padded :] = 0
        extra["attention_mask"] = mask
    if reference is not None:
        extra["reference_latents"] = [reference]
    return [[torch.randn(batch, tokens, QWEN_CONTEXT_DIM, generator=gen), extra]]


def qwen_latent(seed: int = 0, batch: int = 1, size: int = 8) -> dict:
    """A Qwen-Image LATENT: (B, 16, 1, H, W), the single-frame Wan-2.1 layout ComfyUI samples it in."""
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, 16, 1, size, size, generator=gen)}


def wan21_vae(seed: int = 0):
    """A tiny Wan 2.1 VAE (Qwen-Image's VAE: 16 channels, 8x, one latent frame per image) as Load VAE builds it:
    ``comfy.sd.VAE`` recognises the state dict of a ``comfy.ldm.wan.vae.WanVAE`` of width 8."""
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    cfg = {"dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
           "temperal_downsample": [False, True, True], "dropout": 0.0}  # fmt: skip
    with torch.inference_mode():
        model = WanVAE(**cfg)
        tm._init_(model, seed)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        return comfy.sd.VAE(sd=sd)


#: Caption width of the tiny Z-Image (the real one: 2560, Qwen3-4B's hidden size).
ZIMAGE_CAP_DIM = 64
#: Head size 64 split over RoPE axes (caption / frame, row, column), as the real model's 128 = 32 + 48 + 48.
ZIMAGE_AXES = (16, 24, 24)
#: Token padding multiple of Z-Image's caption and image sequences (its ``pad_tokens_multiple``).
ZIMAGE_PAD = 8


def has_z_image() -> bool:
    """Whether this ComfyUI has Z-Image (the ``ZImage`` model config class)."""
    import comfy.supported_models

    return hasattr(comfy.supported_models, "ZImage")


def z_image_config(layers: int = 2, pad: int | None = ZIMAGE_PAD) -> dict:
    """The tiny NextDiT's ``unet_config`` as ComfyUI's detection builds Z-Image's: width 256 (Z-Image's modulation
    reads a 256-wide time embedding, so no narrower), 4 heads of 64, ``layers``
    main layers (and 2 refiner layers each for caption and image), Z-Image modulation, time scale 1000, tokens
    padded to multiples of ``pad``."""
    return {
        "image_model": "lumina2",
        "patch_size": 2,
        "in_channels": 16,
        "dim": 256,
        "cap_feat_dim": ZIMAGE_CAP_DIM,
        "n_layers": layers,
        "n_refiner_layers": 2,
        "qk_norm": True,
        "n_heads": 4,
        "n_kv_heads": 4,
        "multiple_of": 64,
        "axes_dims": list(ZIMAGE_AXES),
        "axes_lens": [64, 32, 32],
        "rope_theta": 256.0,
        "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True,
        "time_scale": 1000.0,
        "pad_tokens_multiple": pad,
        "dtype": torch.float32,
    }


def z_image(seed: int = 31, layers: int = 2, pad: int | None = ZIMAGE_PAD):
    """A tiny Z-Image MODEL (``ZImage`` config -> ``model_base.Lumina2`` -> ``NextDiT``, Flux latent format)."""
    import comfy.supported_models

    model = tm._dit_patcher(comfy.supported_models.ZImage(z_image_config(layers, pad)), seed)
    with torch.inference_mode():  # the pad tokens are parameters `_init_` draws as norms (1-D): make them tokens
        gen = torch.Generator().manual_seed(seed + 7)
        for name, p in model.model.diffusion_model.named_parameters():
            if name.endswith("pad_token"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def z_image_conditioning(seed: int, tokens: int = 11, batch: int = 1):
    """A fake Z-Image CONDITIONING ``[[cond (batch, tokens, 64), {}]]``."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, ZIMAGE_CAP_DIM, generator=gen), {}]]
