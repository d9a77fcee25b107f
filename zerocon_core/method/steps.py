"""Small pure pieces of a sampling step, shared by the inversion and the sampler."""

from __future__ import annotations

from torch import Tensor


def cfg_combine(eps_neg: Tensor, eps_pos: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance: ``eps_neg + cfg * (eps_pos - eps_neg)``."""
    return eps_neg + cfg * (eps_pos - eps_neg)
