"""DiffuseIT's start and first-step resampling, in sigma space (docs/method.md §9).

DiffuseIT does not invert the source: it forward-noises the clean latent to a fixed noise level with fresh
Gaussian noise (SDEdit-style) and samples down from there. What must carry over from its pixel-space ADM
model to a latent model is the *noise level* (SNR), not the fraction of steps skipped: ADM's linear
schedule at DiffuseIT's start (t = 595 of 1000) has alpha_bar = 0.0272, i.e. sigma = 5.98, and its
semantic-divergence gate (t = 505) has alpha_bar = 0.0739, sigma = 3.54. In sigma space these levels are
model-independent for every VP model (SD1.x/2.x/SDXL): SD's scaled-linear schedule reaches them at
t = 835 and t = 715. Flow-matching models (SD3, Flux) take the levels of the same SNR
(``parameterization.sigma_from_vp``: t = sigma / (1 + sigma), 0.857 and 0.780); the constants stay in VP units.

Units: ``x = x0 + sigma * eps`` (sigma space, see ``zerocon_core/__init__.py``); grids are descending.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..common.log import logger
from ..method.parameterization import forward_noise, renoise, vp_sigma  # noqa: F401  (renoise: its old home)

#: Noise level of DiffuseIT's start: ADM linear schedule, t = 595 (alpha_bar 0.0272), sigma = sqrt((1-a)/a).
DIFFUSEIT_START_SIGMA = 5.985
#: DiffuseIT's semantic-divergence gate (``diff_iter``): ADM t = 505 (alpha_bar 0.0739); active above it.
DIFFUSEIT_SEM_SIGMA = 3.539
#: DiffuseIT repeats its first reverse step 10 times (hard-coded ``range(10)``), docs/method.md §9.
DIFFUSEIT_RESAMPLE = 10


def start_index(
    sigmas: Tensor,
    strength: float | None = None,
    start_sigma: float = DIFFUSEIT_START_SIGMA,
    prediction_type: str = "eps",
) -> int:
    """Index into the descending grid ``sigmas`` (``steps + 1`` levels) where a noised start begins.

    ``strength`` in (0, 1]: keep the last ``round(strength * steps)`` steps (at least 1), as img2img's
    "strength"/"denoise". ``None``: the level nearest in log-SNR to the VP level ``start_sigma`` (DiffuseIT's
    SNR; about strength 0.84-0.86 on SD's 50-step DDIM grid); the grid's levels are mapped to VP units by
    ``parameterization.vp_sigma(level, prediction_type)`` (identity for VP models).
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 levels, got shape {tuple(sigmas.shape)}")
    steps = len(sigmas) - 1
    if strength is None:
        if start_sigma <= 0:
            raise ValueError(f"start_sigma must be > 0, got {start_sigma}")
        levels = vp_sigma(sigmas[:-1].double(), prediction_type).clamp_min(1e-12).log()
        return int((levels - math.log(start_sigma)).abs().argmin())
    strength = float(strength)
    if not (0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    kept = min(steps, max(1, int(round(strength * steps))))
    return steps - kept


def noised_start(
    x0: Tensor,
    sigmas: Tensor,
    strength: float | None = None,
    seed: int = 0,
    *,
    start_sigma: float = DIFFUSEIT_START_SIGMA,
    noise: Tensor | None = None,
    prediction_type: str = "eps",
) -> tuple[Tensor, Tensor]:
    """Forward-noise a clean latent ``x0`` (B, C, h, w) to the start level of ``sigmas``.

    Returns ``(x, grid)``: ``x = x0 + grid[0] * eps`` (VP, sigma space; flow: ``(1 - s) x0 + s eps``,
    ``parameterization.forward_noise``) and ``grid = sigmas[k:]``, the truncated descending grid to sample down
    (``k = start_index(sigmas, strength, start_sigma, prediction_type)``). ``eps`` is drawn on the CPU from
    ``seed`` (reproducible across devices) unless ``noise`` is given.
    """
    if not torch.isfinite(x0).all():
        raise ValueError("the latent to noise contains NaN or Inf")
    k = start_index(sigmas, strength, start_sigma, prediction_type)
    grid = sigmas[k:].to(device=x0.device, dtype=x0.dtype)
    if noise is None:
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the latent's {tuple(x0.shape)}")
    logger.debug("noised start at grid index %d, sigma %.4g (%d steps left)", k, float(grid[0]), len(grid) - 1)
    return forward_noise(x0, noise, grid[0], prediction_type), grid
