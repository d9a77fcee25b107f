"""Tiny random models for core tests: no weights, no network, fast on CPU.

Builders are deterministic (seeded). Float64 models let tests compare against diffusers to ~1e-12.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from zerocon_core.diffusers_host.denoiser import DiffusersDenoiser, TextCond

#: Cross-attention width and prompt length of the tiny models (SD: 768 and 77).
TEXT_DIM = 32
TOKENS = 8


def tiny_unet_config(**overrides) -> dict:
    """A two-level SD-style UNet config: 8x8 latents, levels 0 (8x8) and 1 (4x4), 8 heads of width 4/8."""
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    cfg.update(overrides)
    return cfg


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    """A seeded tiny ``UNet2DConditionModel`` in eval mode (float64 by default)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(**overrides)).eval()
    if dtype == torch.float64:
        return unet.double()
    return unet if dtype == torch.float32 else unet.to(dtype)


def smooth_in_time(unet, max_freq: float = 0.005):
    """Make ``unet`` smooth in the timestep, as trained models are: zero the time-embedding weights of the
    sinusoidal frequencies above ``max_freq`` (radians per timestep). A random UNet reads the fastest
    frequencies (period 2*pi timesteps), so its eps jumps between DDIM grid points 20 timesteps apart and
    discretisation errors do not shrink with the step count. Returns ``unet``."""
    proj, lin = unet.time_proj, unet.time_embedding.linear_1
    half = proj.num_channels // 2
    k = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * k / (half - proj.downscale_freq_shift))
    fast = torch.cat([freqs, freqs]) > max_freq  # columns: [cos | sin] or [sin | cos], same frequencies
    with torch.no_grad():
        lin.weight[:, fast] = 0
    return unet


def tiny_sdxl_unet(seed: int = 0, dtype: torch.dtype = torch.float64):
    """A tiny SDXL-style UNet: ``added_cond_kwargs`` with ``text_embeds`` (B, 16) and ``time_ids`` (B, 6)."""
    return tiny_unet(
        seed,
        dtype,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        transformer_layers_per_block=(1, 2),
    )


def sd_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SD1.x/2.x's DDIM scheduler config (scaled_linear 0.00085..0.012, steps_offset 1, no alpha-to-one)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )


def tiny_cond(seed: int, batch: int = 1, tokens: int = TOKENS, dtype: torch.dtype = torch.float64) -> TextCond:
    """A random text conditioning (batch, tokens, TEXT_DIM)."""
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(batch, tokens, TEXT_DIM, generator=g, dtype=dtype))


def tiny_sdxl_cond(seed: int, batch: int = 1, dtype: torch.dtype = torch.float64) -> TextCond:
    """A random SDXL-style conditioning for ``tiny_sdxl_unet``."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, TOKENS, TEXT_DIM, generator=g, dtype=dtype)
    text_embeds = torch.randn(batch, 16, generator=g, dtype=dtype)
    time_ids = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]], dtype=dtype).expand(batch, 6)
    return TextCond(embeds, {"text_embeds": text_embeds, "time_ids": time_ids})


def tiny_latent(seed: int, batch: int = 1, dtype: torch.dtype = torch.float64, size: int = 8) -> torch.Tensor:
    """A random (batch, 4, size, size) latent."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g, dtype=dtype)


def tiny_denoiser(
    prediction_type: str = "epsilon",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    keep_copy: bool = False,
    smooth: bool = False,
):
    """A ``DiffusersDenoiser`` over ``tiny_unet(seed)`` with SD's schedule (``smooth``: ``smooth_in_time``).

    With ``keep_copy`` returns ``(denoiser, unet_copy)``: an untouched deep copy of the UNet (diffusers' own
    attention processors) for reference loops.
    """
    from diffusers import DDIMScheduler

    unet = tiny_unet(seed, dtype)
    if smooth:
        smooth_in_time(unet)
    original = copy.deepcopy(unet) if keep_copy else None
    sched = DDIMScheduler.from_config(sd_scheduler_config(prediction_type))
    den = DiffusersDenoiser(unet, scheduler_config=sched)
    return (den, original) if keep_copy else den


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms)."""
    return float((a - b).norm() / b.norm())


def f64(sched):
    """Give a diffusers DDIM(-inverse) scheduler float64 alpha tables, so both sides do float64 arithmetic
    on the same (float32-derived) alpha-bar values the denoiser's sigma table is built from."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    for attr in ("initial_alpha_cumprod", "final_alpha_cumprod"):
        if hasattr(sched, attr):
            setattr(sched, attr, torch.as_tensor(getattr(sched, attr)).double())
    return sched


def randn64(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal float64 values of ``shape``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rand_image(seed: int, b: int = 1, h: int = 32, w: int = 32) -> torch.Tensor:
    """A seeded uniform-random float64 image batch ``(b, 3, h, w)`` in [0, 1]."""
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tiny_vae_config(**overrides) -> dict:
    """A 4-level (x8) AutoencoderKL config, 8/8/16/16 channels, SD's scaling factor (64 px -> 8x8 latents)."""
    cfg = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    cfg.update(overrides)
    return cfg


def tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``AutoencoderKL`` (``tiny_vae_config(**overrides)``) in eval mode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**tiny_vae_config(**overrides)).eval().to(dtype)


def tiny_sd_folder(folder: Path, prediction_type: str = "epsilon", sdxl: bool = False) -> Path:
    """A diffusers-layout SD folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/ + model_index.json.

    UNet: :func:`tiny_unet` (fp32, 8x8 latents, cross-attention width 32); VAE: :func:`tiny_vae`; text encoder:
    ``tiny_text.tiny_clip`` (width 32). ``sdxl``: an SDXL-style folder (two 16-wide CLIPs concatenated to the
    UNet's 32, pooled 16 + time ids).
    """
    import json

    from diffusers import DDIMScheduler

    from .tiny_text import tiny_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = tiny_sdxl_unet(seed=0, dtype=torch.float32) if sdxl else tiny_unet(seed=0, dtype=torch.float32)
    unet.save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    tok, te = tiny_clip(folder / "tokenizer", hidden=16 if sdxl else 32)
    tok.save_pretrained(folder / "tokenizer")
    te.save_pretrained(folder / "text_encoder")
    if sdxl:
        tok2, te2 = tiny_clip(folder / "tokenizer_2", hidden=16, projection=16, pad_token="!", seed=1)
        tok2.save_pretrained(folder / "tokenizer_2")
        te2.save_pretrained(folder / "text_encoder_2")
    DDIMScheduler.from_config(sd_scheduler_config(prediction_type)).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    return folder


#: Size of the test PNG (W x H): not a multiple of 8.
PNG_W, PNG_H = 44, 36


def write_png(path: Path, w: int = PNG_W, h: int = PNG_H) -> Path:
    """A ``w`` x ``h`` RGB gradient PNG at ``path`` (default 44x36: not a multiple of 8)."""
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return path
