"""Tiny models and inputs of the families added for 2026 (Flux.1 Kontext, Chroma), built from ComfyUI's own classes.

Kontext is the Flux.1 network (``model_base.Flux``) with reference latents in the conditioning, as ComfyUI's
ReferenceLatent node sets them (``reference_latents``: a list of 16-channel latents, appended to the
conditioning's values); ``model_base.Flux.extra_conds`` turns them into ``ref_latents``, whose tokens the network
appends after the image tokens (RoPE index 1, the "offset" method). The builders of the network itself are
``tiny_models``' (seeded random weights under inference mode, as a loader builds them).
"""

from __future__ import annotations

import tiny_models as tm
import torch


def reference_latent(seed: int = 40, height: int = 12, width: int = 16) -> torch.Tensor:
    """A 16-channel reference LATENT's samples (1, 16, height, width): on purpose not the image's size, so its
    token count differs from the image's."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, height, width, generator=gen)


def kontext_conditioning(seed: int, reference: torch.Tensor | None = None, tokens: int = 16, guidance=3.5):
    """A Flux-dev CONDITIONING with ``reference`` in ``reference_latents`` (ReferenceLatent's key), as a Kontext
    workflow hands it to the sampler."""
    cond = tm.flow_conditioning(seed, tokens=tokens, guidance=guidance)
    ref = reference_latent() if reference is None else reference
    return [[cond[0][0], {**cond[0][1], "reference_latents": [ref]}]]


# -- Chroma -------------------------------------------------------------------------------------------------------


def has_chroma() -> bool:
    """Whether this ComfyUI has Chroma (its model config class and network)."""
    import comfy.supported_models

    try:
        import comfy.ldm.chroma.model  # noqa: F401
    except ImportError:
        return False
    return hasattr(comfy.supported_models, "Chroma")


def chroma_config() -> dict:
    """A tiny Chroma ``unet_config`` (1 double + 1 single block, width 32, 2 heads, RoPE axes 4/6/6, T5 width 64).

    As ComfyUI's detection writes it: ``in_channels`` / ``out_channels`` count a 2 x 2 patch of the 16-channel
    latent (64); the approximator maps the 64-wide (timestep, guidance, index) embedding to the width of the
    blocks; ``txt_ids_dims`` / ``vec_in_dim`` where this ComfyUI's ``ChromaParams`` has them."""
    from comfy.ldm.chroma.model import ChromaParams

    cfg = {
        "image_model": "chroma",
        "in_channels": 64,
        "out_channels": 64,
        "context_in_dim": tm.CONTEXT_DIM,
        **tm.flux_blocks(),
        "in_dim": 64,
        "out_dim": 32,
        "hidden_dim": 32,
        "n_layers": 1,
    }
    fields = ChromaParams.__dataclass_fields__
    if "txt_ids_dims" in fields:
        cfg["txt_ids_dims"] = []
    if "vec_in_dim" in fields:
        cfg["vec_in_dim"] = None
    return cfg


def chroma(seed: int = 20):
    """A tiny Chroma model from ComfyUI's ``supported_models.Chroma`` (``model_base.Chroma``, Flux latent format)."""
    import comfy.supported_models

    return tm._dit_patcher(comfy.supported_models.Chroma(chroma_config()), seed)


def t5_conditioning(seed: int, tokens: int = 16, batch: int = 1, pad: int = 0, grid: tuple[int, int] = (8, 8)):
    """A fake Chroma CONDITIONING: T5 tokens only (``pooled_output`` None). With ``pad`` > 0 the last ``pad`` text tokens
    are padding, masked out of every query's keys by an additive key mask (B, 1, tokens + image tokens): 0 kept,
    -inf on the padding, for a latent of ``grid`` patches (``attention_mask_img_shape``, without which
    ``model_base.Flux.extra_conds`` drops the mask)."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, tm.CONTEXT_DIM, generator=gen)
    extra = {"pooled_output": None}  # what CLIPTextEncode gives for a T5-only encoder
    if pad:
        mask = torch.zeros(batch, 1, tokens + grid[0] * grid[1])
        mask[..., tokens - pad : tokens] = float("-inf")
        extra.update(attention_mask=mask, attention_mask_img_shape=grid)
    return [[cond, extra]]


# -- Flux.2 ----------------------------------------------------------------------------------------------------------


def has_flux2() -> bool:
    """Whether this ComfyUI has Flux.2 (``supported_models.Flux2`` and ``model_base.Flux2``)."""
    import comfy.model_base
    import comfy.supported_models

    return hasattr(comfy.supported_models, "Flux2") and hasattr(comfy.model_base, "Flux2")


def flux2(seed: int = 30, klein: bool = False):
    """A tiny Flux.2 model as ComfyUI's detection configures one (128-channel latent, patch size 1, global
    modulation, SiLU-gated MLPs, no biases, 4-axis RoPE with the text position on axis 3), width 32, 2 heads:
    dev (a guidance embedding) or, with ``klein``, Klein (none: real CFG)."""
    import comfy.supported_models

    cfg = {
        "image_model": "flux2",
        "in_channels": 128,
        "out_channels": 128,
        "patch_size": 1,
        "vec_in_dim": None,
        "context_in_dim": tm.CONTEXT_DIM,
        "hidden_size": 32,
        "mlp_ratio": 3.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [4, 4, 4, 4],
        "theta": 2000,
        "qkv_bias": False,
        "guidance_embed": True,
        "txt_ids_dims": [3],
        "global_modulation": True,
        "mlp_silu_act": True,
        "ops_bias": False,
        "default_ref_method": "index",
        "ref_index_scale": 10.0,
    }
    if klein:
        cfg["guidance_embed"] = False
    return tm._dit_patcher(comfy.supported_models.Flux2(cfg), seed)


def flux2_latent(seed: int = 0, size: int = 8, channels: int = 128) -> dict:
    """A Flux.2 LATENT dict: 128 channels (the VAE's 32 packed 2 x 2), one cell per 16 pixels."""
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(1, channels, size, size, generator=gen)}


def flux2_conditioning(seed: int, tokens: int = 16, guidance: float | None = 4.0, reference=None):
    """A Flux.2 CONDITIONING: LLM-like hidden states (no pooled output), dev's ``guidance`` when given, and
    ``reference`` (a 128-channel latent) in ``reference_latents`` as ReferenceLatent sets it (Klein's edit mode)."""
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": None}
    if guidance is not None:
        extra["guidance"] = guidance
    if reference is not None:
        extra["reference_latents"] = [reference]
    return [[torch.randn(1, tokens, tm.CONTEXT_DIM, generator=gen), extra]]


def flux2_vae(seed: int = 0):
    """A tiny Flux.2 ``comfy.sd.VAE``: ComfyUI's AutoencoderKL with its latent batch norm (32 channels packed 2 x 2
    into 128 and normalised, one cell per 16 pixels), built from ``tiny_models.FLOW_VAE_CONFIG`` at 32 channels.
    ComfyUI's config path assumes 4 channels and 8x, so channels and ratios are set afterwards, as its own
    detection sets them for a state dict with ``bn.running_mean``."""
    import copy

    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = copy.deepcopy(tm.FLOW_VAE_CONFIG)
    config["params"]["embed_dim"] = 32
    config["params"]["ddconfig"].update(z_channels=32, batch_norm_latent=True)
    with torch.inference_mode():
        model = AutoencoderKL(**config["params"])
        tm._init_(model, seed)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        vae = comfy.sd.VAE(sd=sd, config=config)
    vae.latent_channels = 128
    vae.downscale_ratio = vae.upscale_ratio = 16
    return vae
