"""Tiny randomly initialised ComfyUI models (SD1.5-, SD2-v- and SDXL-shaped) built from ComfyUI's own classes.

They are built the way a loader node builds a real checkpoint: under ``torch.inference_mode()``, so the
weights are inference tensors (as in a real ComfyUI run), then wrapped in a ``ModelPatcher``. Weights are
random (seeded) because ``comfy.ops.disable_weight_init`` leaves them uninitialised. No checkpoint, no hub.
"""

from __future__ import annotations

import torch

# Shared by every tiny UNet: 2 levels (32, 64 channels), one transformer block per attention block.
CONTEXT_DIM = 64
POOLED_DIM = 32  # SDXL pooled_output width; adm = pooled + 6 x 256 size embeddings


def _unet_config(**over) -> dict:
    cfg = {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "use_spatial_transformer": True,
        "legacy": False,
        "context_dim": CONTEXT_DIM,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "dtype": torch.float32,
    }
    cfg.update(over)
    return cfg


def _init_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        elif name.endswith("weight"):  # norms
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def _patcher(config, model_type=None, seed: int = 0):
    import comfy.model_management as mm
    import comfy.model_patcher

    with torch.inference_mode():
        config.unet_config["num_heads"] = 4
        config.unet_config["num_head_channels"] = -1
        if model_type is None:
            base = config.get_model({})
        else:
            import comfy.model_base

            base = comfy.model_base.BaseModel(config, model_type=model_type)
        _init_(base.diffusion_model, seed)
        base.eval()
        return comfy.model_patcher.ModelPatcher(
            base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )


def sd15(seed: int = 0):
    """An SD1.5-shaped tiny model (EPS, 4-channel latent, SD15 latent format, context 64)."""
    import comfy.supported_models

    return _patcher(comfy.supported_models.SD15(_unet_config()), seed=seed)


def sd2v(seed: int = 1):
    """An SD2.x-768-v-shaped tiny model (v-prediction, linear projections in the transformers)."""
    import comfy.model_base
    import comfy.supported_models

    cfg = comfy.supported_models.SD20(_unet_config(use_linear_in_transformer=True))
    return _patcher(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION, seed=seed)


def sdxl(seed: int = 2):
    """An SDXL-shaped tiny model (ADM ``y`` from pooled_output + size embeddings, SDXL latent format)."""
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(
        _unet_config(
            use_linear_in_transformer=True,
            adm_in_channels=POOLED_DIM + 6 * 256,
            num_classes="sequential",
            transformer_depth=[0, 2],
            transformer_depth_output=[0, 0, 2, 2],
            transformer_depth_middle=2,
        )
    )
    return _patcher(cfg, seed=seed)


def conditioning(seed: int, tokens: int = 77, pooled: bool = False, batch: int = 1):
    """A fake CONDITIONING: ``[[cond (batch, tokens, 64), {"pooled_output": ...}]]``."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, CONTEXT_DIM, generator=gen)
    extra = {}
    if pooled:
        extra["pooled_output"] = torch.randn(batch, POOLED_DIM, generator=gen)
    return [[cond, extra]]


def latent(seed: int = 0, batch: int = 1, size: int = 16) -> dict:
    """A LATENT dict with VAE-scale values (ComfyUI scales by the latent format inside the sampler)."""
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, 4, size, size, generator=gen) * 4.0}


def flux(seed: int = 3):
    """A tiny Flux model: a family the ZeroCon samplers do not support (for the error path)."""
    import comfy.supported_models

    cfg = {
        "image_model": "flux",
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "vec_in_dim": POOLED_DIM,
        "context_in_dim": CONTEXT_DIM,
        "hidden_size": 32,
        "mlp_ratio": 2.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [4, 6, 6],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": False,
    }
    import comfy.model_management as mm
    import comfy.model_patcher

    with torch.inference_mode():
        base = comfy.supported_models.Flux(cfg).get_model({})
        _init_(base.diffusion_model, seed)
        return comfy.model_patcher.ModelPatcher(
            base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )
