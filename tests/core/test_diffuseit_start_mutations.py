"""DiffuseIT's noising (zerocon_core.diffuseit.start) against the forward-process formulas in sigma space.

A latent at level ``s`` is ``x = x0 + s * eps``; going up from ``s_a`` to ``s_b`` adds independent noise of
variance ``s_b^2 - s_a^2`` and leaves the latent itself unscaled (the VP factors ``sqrt(a_b / a_a)`` exist
only in VP units). Fails on a VP mixture written in sigma space or a linear ``s_b - s_a`` noise scale; the
std-only test in test_diffuseit_start.py (on a zero latent) lets the first through.
"""

from __future__ import annotations

import math

import pytest
import torch

from zerocon_core.diffuseit.start import noised_start, renoise
from zerocon_core.method.schedule import alpha_bar_from_sigma, ddim_sigmas, sd_sigma_table

from .tiny import tiny_latent


def draws(shape, seed):
    """The float32 CPU normal draws of a generator seeded ``seed``, as float64."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()


@pytest.mark.parametrize("s_a,s_b", [(1.0, 2.0), (0.3, 5.9), (4.0, 4.0)])
def test_renoise_is_the_sigma_space_forward_transition(s_a, s_b):
    x = tiny_latent(3) * 2 + 0.5
    out = renoise(x, s_a, s_b, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x + math.sqrt(s_b**2 - s_a**2) * draws(x.shape, 7), rtol=0, atol=1e-12)


def test_renoise_matches_the_vp_transition():
    """The same step in VP units: ``z_b = sqrt(a_b / a_a) z_a + sqrt(1 - a_b / a_a) eps`` with ``z = x sqrt(a)``."""
    s_a, s_b = torch.tensor(0.8, dtype=torch.float64), torch.tensor(3.1, dtype=torch.float64)
    a_a, a_b = alpha_bar_from_sigma(s_a), alpha_bar_from_sigma(s_b)
    x = tiny_latent(5)
    z_b = (a_b / a_a).sqrt() * (x * a_a.sqrt()) + (1 - a_b / a_a).sqrt() * draws(x.shape, 2)
    out = renoise(x, s_a, s_b, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out * a_b.sqrt(), z_b, rtol=1e-12, atol=1e-12)


def test_noised_start_is_the_forward_process_from_the_clean_latent():
    """``x = x0 + s * eps`` at the start level, i.e. ``z = sqrt(a) x0 + sqrt(1 - a) eps`` in VP units."""
    sig = ddim_sigmas(sd_sigma_table(), 20)
    x0 = tiny_latent(8)
    x, grid = noised_start(x0, sig, 0.5, seed=4)
    a = alpha_bar_from_sigma(grid[0].double())
    z = a.sqrt() * x0 + (1 - a).sqrt() * draws(x0.shape, 4)
    torch.testing.assert_close(x * a.sqrt(), z, rtol=1e-12, atol=1e-12)
