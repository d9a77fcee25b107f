"""Tiny randomly initialised ComfyUI models (SD1.5-, SD2-v-, SDXL-, Flux- and SD3-shaped) built from ComfyUI's own classes.

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


def flux_params_compat(cfg: dict) -> dict:
    """``cfg`` (a hand-written Flux ``unet_config``) with what this ComfyUI's ``FluxParams`` requires beyond the
    Flux-1 fields: ``txt_ids_dims`` (``[]``, no text-position axes, as its detection sets for a Flux-1
    checkpoint) where the dataclass has that field; ComfyUI versions without it reject the key."""
    from comfy.ldm.flux.model import FluxParams

    if "txt_ids_dims" in FluxParams.__dataclass_fields__:
        cfg.setdefault("txt_ids_dims", [])
    return cfg


def flux_blocks() -> dict:
    """The blocks of every tiny Flux-like ``unet_config`` (Flux, Chroma): 1 double + 1 single block, width 32,
    2 heads, 2 x 2 patches, RoPE axes 4/6/6."""
    return {
        "patch_size": 2,
        "hidden_size": 32,
        "mlp_ratio": 2.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [4, 6, 6],
        "theta": 10000,
        "qkv_bias": True,
    }


def _flux_config(guidance_embed: bool, context_dim: int = CONTEXT_DIM, pooled_dim: int = POOLED_DIM) -> dict:
    cfg = {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": pooled_dim,
        "context_in_dim": context_dim,
        **flux_blocks(),
        "guidance_embed": guidance_embed,
    }
    return flux_params_compat(cfg)


def _dit_patcher(config, seed: int):
    import comfy.model_management as mm
    import comfy.model_patcher

    with torch.inference_mode():
        base = config.get_model({})
        net = base.diffusion_model
        _init_(net, seed)
        gen = torch.Generator().manual_seed(seed + 1000)
        # RMS-norm scales (Flux's QK-norm) about 1, as trained ones are: ComfyUI's own RMSNorm names them "scale"
        # (older versions); newer ones use torch's RMSNorm, whose 1-D "weight" `_init_` already draws about 1
        for name, p in net.named_parameters():
            if name.endswith(".scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        pos = getattr(net, "pos_embed", None)  # SD3's position table is a buffer `_init_` leaves uninitialised
        if isinstance(pos, torch.Tensor):
            pos.copy_(0.02 * torch.randn(pos.shape, generator=gen))
        base.eval()
        return comfy.model_patcher.ModelPatcher(
            base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )


def flux(
    seed: int = 3,
    guidance_embed: bool = False,
    context_dim: int = CONTEXT_DIM,
    pooled_dim: int = POOLED_DIM,
    weight_dtype: torch.dtype | None = None,
):
    """A tiny Flux model (1 double + 1 single block, width 32, 2 heads, RoPE axes 4/6/6, 16-channel latent).

    ``guidance_embed`` False: Flux-schnell-like; True: Flux-dev-like (distilled guidance read from the
    conditioning's ``guidance`` value). Context width 64, pooled (``vec``) width 32 by default; 4096 / 32 take
    ``tiny_clip.flux_clip``'s conditioning. ``weight_dtype`` (e.g. fp16): weights stored in it and cast per layer to
    float32 by ``comfy.ops.manual_cast``, as ComfyUI loads them on a device that computes in float32."""
    import comfy.supported_models

    config = comfy.supported_models.Flux(_flux_config(guidance_embed, context_dim, pooled_dim))
    if weight_dtype is not None:
        config.set_inference_dtype(weight_dtype, torch.float32)
    return _dit_patcher(config, seed)


def flux_dev(seed: int = 4, **dims):
    """A tiny Flux-dev-like model (guidance embedding on)."""
    return flux(seed, guidance_embed=True, **dims)


def sd3(seed: int = 5, depth: int = 2, context_dim: int = CONTEXT_DIM, pooled_dim: int = POOLED_DIM):
    """A tiny SD3-shaped MMDiT (ComfyUI ties width to depth: 64 per block, so depth 2 is 128 wide with 2 heads).

    16-channel latent (SD3 latent format), patch size 2, context 64 wide (projected by ``context_embedder``),
    pooled width 32 by default (4096 / 64 take ``tiny_clip.sd3_clip``'s conditioning), ModelSamplingDiscreteFlow
    with shift 3."""
    import comfy.supported_models

    unet_config = {
        "in_channels": 16,
        "pos_embed_scaling_factor": None,
        "patch_size": 2,
        "depth": depth,
        "num_patches": 64 * 64,
        "pos_embed_max_size": 64,
        "adm_in_channels": pooled_dim,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": context_dim, "out_features": 64 * depth},
        },
        "dtype": torch.float32,
    }
    return _dit_patcher(comfy.supported_models.SD3(unet_config), seed)


def flow_conditioning(seed: int, tokens: int = 16, batch: int = 1, guidance: float | None = None):
    """A fake Flux / SD3 CONDITIONING: ``[[cond (batch, tokens, 64), {"pooled_output": (batch, 32)}]]``, with
    Flux-dev's ``guidance`` value when given."""
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(batch, POOLED_DIM, generator=gen)}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=gen), extra]]


def flow_latent(seed: int = 0, batch: int = 1, size: int = 16) -> dict:
    """A 16-channel LATENT dict (Flux / SD3 VAE scale)."""
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, 16, size, size, generator=gen)}


# -- flow-family extras: a 16-channel VAE, and Flux / SD variants ZeroCon refuses ------------------------------

FLOW_VAE_CONFIG = {
    "params": {
        "embed_dim": 16,
        "ddconfig": {
            "double_z": True,
            "z_channels": 16,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,  # GroupNorm(32 groups) needs a multiple of 32
            "ch_mult": [1, 1, 1, 1],  # 3 downsamplings: 8x, like the Flux / SD3 VAE
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }
}


def flow_vae(seed: int = 0):
    """A tiny 16-channel ``comfy.sd.VAE`` (AutoencoderKL, 8x) standing in for the Flux / SD3 VAE.

    Built from ``FLOW_VAE_CONFIG`` (ComfyUI's ``config=`` path, which assumes 4 channels, so ``latent_channels``
    is set to the config's 16 afterwards, as ComfyUI's own detection sets it for a 16-channel state dict)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.inference_mode():
        model = AutoencoderKL(**FLOW_VAE_CONFIG["params"])
        _init_(model, seed)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        vae = comfy.sd.VAE(sd=sd, config=FLOW_VAE_CONFIG)
    vae.latent_channels = 16
    return vae


def flux_fill(seed: int = 6):
    """A tiny Flux Fill / inpainting model (96 input channels: latent + mask + masked image): not supported."""
    import comfy.supported_models

    cfg = _flux_config(True)
    cfg["in_channels"] = 96
    return _dit_patcher(comfy.supported_models.FluxInpaint(cfg), seed)


def sd15_inpaint(seed: int = 7):
    """A tiny SD1.5 inpainting UNet (9 input channels): not supported."""
    import comfy.supported_models

    return _patcher(comfy.supported_models.SD15(_unet_config(in_channels=9)), seed=seed)


def sd15_as_loaded(
    weight_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    state_dict: dict | None = None,
    seed: int = 0,
):
    """The tiny SD1.5 model as ComfyUI's checkpoint loader builds it for a precision (``comfy.sd``'s
    ``load_state_dict_guess_config``): the config's ``set_inference_dtype(weight_dtype, compute_dtype)`` picks
    the weight dtype and ``comfy.ops`` (``manual_cast`` when ``compute_dtype`` differs: weights cast per layer
    to it), then ``load_model_weights`` copies the UNet state dict in (cast to ``weight_dtype``).

    ``state_dict``: UNet weights without prefix (default: those of ``sd15(seed)``, fp32), so every variant holds
    the same weights rounded to its dtype. fp16 / bf16 with ``compute_dtype`` None is ``--fp16-unet`` /
    ``--bf16-unet`` on a device that computes in that dtype; fp16 weights with ``compute_dtype`` fp32 is what
    ComfyUI does with them on a CPU."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if state_dict is None:
        state_dict = sd15(seed).model.diffusion_model.state_dict()
    config = comfy.supported_models.SD15(_unet_config(dtype=weight_dtype))
    config.set_inference_dtype(weight_dtype, compute_dtype)
    config.unet_config["num_heads"] = 4
    config.unet_config["num_head_channels"] = -1
    with torch.inference_mode():
        base = config.get_model({})
        prefix = "model.diffusion_model."
        base.load_model_weights({prefix + k: v for k, v in state_dict.items()}, prefix)
        base.eval()
        return comfy.model_patcher.ModelPatcher(
            base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )
