"""The full-width MM-DiT families ``bench_dit.py`` times: each one's ComfyUI config, conditionings and latent.

Every network is ComfyUI's own class at its real width, with few blocks: Flux.1-dev, Chroma, Flux.2 Klein 4B,
Qwen-Image and Z-Image. ``blocks`` is (first stack, second stack): Flux-like (double, single); Qwen-Image
(double-stream blocks, unused); Z-Image (main layers, refiner layers: Z-Image has 2 + 2 refiners, 1 each here
keeps them from outweighing the one or two main layers timed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class DitFamily:
    """One family: ``config(blocks)`` its ``unet_config``, ``config_class`` its ``comfy.supported_models`` class,
    ``context`` / ``text_tokens`` / ``pooled`` / ``guidance`` its conditioning, ``latent(size)`` its latent's
    shape at ``size`` px, ``heads`` x ``head_dim`` its joint attention (for the capture-memory figures) and the
    pixels per image token, and ``cfg`` the CFG its workflows use."""

    name: str
    config_class: str
    config: Callable[[tuple[int, int]], dict]
    context: int
    text_tokens: int
    heads: int
    head_dim: int
    latent: Callable[[int], tuple[int, ...]]
    cfg: float
    pooled: int | None = None
    guidance: float | None = None
    px_per_token: int = 16


def _flux_params(cfg: dict) -> dict:
    """``cfg`` with the Flux params fields this ComfyUI's ``FluxParams`` requires (``txt_ids_dims``)."""
    from comfy.ldm.flux.model import FluxParams

    if "txt_ids_dims" in FluxParams.__dataclass_fields__:
        cfg.setdefault("txt_ids_dims", [])
    return cfg


def flux(blocks: tuple[int, int]) -> dict:
    """Flux.1-dev: width 3072, 24 heads of 128, T5 context 4096, CLIP-L pooled 768, RoPE 16/56/56."""
    return _flux_params(
        {
            "image_model": "flux",
            "in_channels": 16,
            "patch_size": 2,
            "out_channels": 16,
            "vec_in_dim": 768,
            "context_in_dim": 4096,
            "hidden_size": 3072,
            "mlp_ratio": 4.0,
            "num_heads": 24,
            "depth": blocks[0],
            "depth_single_blocks": blocks[1],
            "axes_dim": [16, 56, 56],
            "theta": 10000,
            "qkv_bias": True,
            "guidance_embed": True,
        }  # fmt: skip
    )


def chroma(blocks: tuple[int, int]) -> dict:
    """Chroma: Flux's blocks at width 3072, T5 only, the approximator's modulations (64 -> 5120 x 5 -> 3072)."""
    from comfy.ldm.chroma.model import ChromaParams

    cfg = {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "context_in_dim": 4096,
        "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": blocks[0], "depth_single_blocks": blocks[1],
        "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "in_dim": 64, "out_dim": 3072,
        "hidden_dim": 5120, "n_layers": 5,
    }  # fmt: skip
    if "txt_ids_dims" in ChromaParams.__dataclass_fields__:
        cfg["txt_ids_dims"] = []
    if "vec_in_dim" in ChromaParams.__dataclass_fields__:
        cfg["vec_in_dim"] = None
    return cfg


def flux2_klein(blocks: tuple[int, int]) -> dict:
    """Flux.2 Klein 4B: width 3072, 24 heads of 128, Qwen3-4B context (three layers: 7680), global modulation,
    SiLU-gated MLPs, no biases, 4-axis RoPE 32/32/32/32 with the text on axis 3, 128-channel latents, patch 1."""
    return _flux_params(
        {
            "image_model": "flux2",
            "in_channels": 128,
            "out_channels": 128,
            "patch_size": 1,
            "vec_in_dim": None,
            "context_in_dim": 7680,
            "hidden_size": 3072,
            "mlp_ratio": 3.0,
            "num_heads": 24,
            "depth": blocks[0],
            "depth_single_blocks": blocks[1],
            "axes_dim": [32, 32, 32, 32],
            "theta": 2000,
            "qkv_bias": False,
            "guidance_embed": False,
            "txt_ids_dims": [3],
            "global_modulation": True,
            "mlp_silu_act": True,
            "ops_bias": False,
            "default_ref_method": "index",
            "ref_index_scale": 10.0,
        }  # fmt: skip
    )


def qwen_image(blocks: tuple[int, int]) -> dict:
    """Qwen-Image: 24 heads of 128 (width 3072), Qwen2.5-VL-7B context 3584, RoPE 16/56/56."""
    return {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": blocks[0],
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
        "axes_dims_rope": (16, 56, 56),
    }  # fmt: skip


def z_image(blocks: tuple[int, int]) -> dict:
    """Z-Image: NextDiT width 3840, 30 heads of 128, Qwen3-4B context 2560, RoPE 32/48/48, Z-Image modulation."""
    return {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
        "n_layers": blocks[0], "n_refiner_layers": blocks[1], "qk_norm": True, "n_heads": 30, "n_kv_heads": 30,
        "multiple_of": 256, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
        "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
        "pad_tokens_multiple": 32,
    }  # fmt: skip


def _image(channels: int, scale: int, frame: bool = False) -> Callable[[int], tuple[int, ...]]:
    def shape(size: int) -> tuple[int, ...]:
        side = size // scale
        return (1, channels, 1, side, side) if frame else (1, channels, side, side)

    return shape


FAMILIES = {
    "flux": DitFamily("Flux.1-dev", "Flux", flux, 4096, 512, 24, 128, _image(16, 8), 1.0, pooled=768, guidance=3.5),
    "chroma": DitFamily("Chroma", "Chroma", chroma, 4096, 128, 24, 128, _image(16, 8), 4.0),
    "flux2": DitFamily("Flux.2 Klein 4B", "Flux2", flux2_klein, 7680, 512, 24, 128, _image(128, 16), 1.0),
    "qwen": DitFamily("Qwen-Image", "QwenImage", qwen_image, 3584, 128, 24, 128, _image(16, 8, frame=True), 4.0),
    "zimage": DitFamily("Z-Image", "ZImage", z_image, 2560, 128, 30, 128, _image(16, 8), 1.0),
}
