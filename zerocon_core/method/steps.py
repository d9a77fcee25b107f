"""Small pure pieces of a sampling step, shared by the inversion and the sampler (sigma space: ``x = x0 +
sigma * eps`` for VP models; for flow models ``eps`` is the velocity and the same step is Euler)."""

from __future__ import annotations

from torch import Tensor


def cfg_combine(eps_neg: Tensor, eps_pos: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance: ``eps_neg + cfg * (eps_pos - eps_neg)``."""
    return eps_neg + cfg * (eps_pos - eps_neg)


def ddim_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """DDIM (eta = 0) in sigma space from ``sigma`` to ``sigma_next``: ``x + (sigma_next - sigma) * eps`` (= x0
    when ``sigma_next`` is 0). Up an ascending grid it is the inversion's step."""
    return x + (sigma_next - sigma) * eps


def denoised(x: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """The clean prediction at ``sigma``: ``x - sigma * eps`` (``ddim_step`` to 0)."""
    return x - sigma * eps
