"""Noise schedules in sigma space: sigma <-> alpha-bar, SD's discrete table, DDIM step grids.

Units: ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (k-diffusion / ComfyUI convention); ``t`` is an
integer training timestep in ``[0, T)``. Grids are 1-D float tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """sigma = sqrt((1 - a) / a), elementwise."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """alpha_bar = 1 / (1 + sigma^2), elementwise."""
    return 1.0 / (1.0 + sigma**2)


def vp_scale(sigma: Tensor | float) -> Tensor | float:
    """sqrt(alpha_bar) at ``sigma``: a VP latent is ``z = vp_scale(sigma) * x`` for a sigma-space ``x``."""
    if isinstance(sigma, Tensor):
        return (1.0 + sigma**2).rsqrt()
    return (1.0 + sigma**2) ** -0.5


def sd_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Stable Diffusion's ``scaled_linear`` schedule (diffusers; ComfyUI calls it "linear"): alpha_bar[t]."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def sd_sigma_table(num_train_timesteps: int = 1000, dtype: torch.dtype = torch.float64) -> Tensor:
    """SD's training sigmas, ascending, indexed by timestep: ``table[t] = sigma(t)``."""
    return sigma_from_alpha_bar(sd_alphas_cumprod(num_train_timesteps, dtype=torch.float64)).to(dtype)


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> Tensor:
    """DDIM sampling timesteps, descending, as diffusers' ``DDIMScheduler`` with "leading" spacing.

    For SD (``steps_offset=1``) and 50 steps this is 981, 961, ..., 1. Raises ``ValueError`` if
    ``steps`` is not in ``[1, num_train_timesteps]``.
    """
    check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps // steps
    t = torch.arange(steps, dtype=torch.int64) * ratio + steps_offset
    if int(t[-1]) >= num_train_timesteps:
        raise ValueError(
            f"{steps} steps with steps_offset {steps_offset} would reach timestep {int(t[-1])}, past the model's "
            f"last ({num_train_timesteps - 1}); use at most {num_train_timesteps - steps_offset} steps"
        )
    return t.flip(0)


def check_steps(steps: int, num_train_timesteps: int = 1000) -> None:
    """Raise a clear ``ValueError`` unless ``1 <= steps <= num_train_timesteps``."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {num_train_timesteps} training timesteps")


def ddim_sigmas(sigma_table: Tensor, steps: int, final: str = "alpha0", steps_offset: int = 1) -> Tensor:
    """Descending sigma grid of ``steps + 1`` levels for DDIM sampling.

    ``sigma_table`` holds the model's training sigmas indexed by timestep (ascending). The grid visits
    ``sigma_table[t]`` for the DDIM timesteps, then a final level: ``"alpha0"`` = ``sigma_table[0]``
    (diffusers with ``set_alpha_to_one=False``, as SD ships) or ``"zero"`` (ComfyUI's ``ddim_uniform``).
    """
    t = ddim_timesteps(steps, len(sigma_table), steps_offset)
    grid = sigma_table[t]
    if final == "alpha0":
        last = sigma_table[:1]
    elif final == "zero":
        last = sigma_table.new_zeros(1)
    else:
        raise ValueError(f"final must be 'alpha0' or 'zero', got {final!r}")
    return torch.cat([grid, last])


def inversion_sigmas(sampling_sigmas: Tensor, start: float | None = None) -> Tensor:
    """Ascending grid for DDIM inversion: the sampling grid reversed.

    A leading zero is replaced by ``start`` (default 1e-4, as ComfyUI's FlipSigmas) so that the model is
    never queried at sigma = 0.
    """
    flipped = sampling_sigmas.flip(0).clone()
    if float(flipped[0]) == 0.0:
        flipped[0] = 1e-4 if start is None else start
    elif start is not None:
        flipped[0] = start
    return flipped


def timestep_from_sigma(sigma: Tensor, sigma_table: Tensor) -> Tensor:
    """Continuous timestep for ``sigma``, interpolated linearly in log-sigma over ``sigma_table``.

    Exact for sigmas on the table; clamps to ``[0, T-1]`` (as ComfyUI's ``ModelSamplingDiscrete.timestep``
    for table sigmas).
    """
    log_table = sigma_table.double().log()
    log_s = sigma.double().clamp_min(float(sigma_table[0])).log()
    idx = torch.searchsorted(log_table, log_s.reshape(-1)).clamp(1, len(log_table) - 1)
    lo, hi = log_table[idx - 1], log_table[idx]
    w = ((log_s.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
    t = (idx - 1).double() + w
    return t.reshape(sigma.shape).to(sigma.dtype if sigma.is_floating_point() else torch.float64)
