"""DiffuseIT's start (zerocon_core.diffuseit.start): the noised start level and the exact re-noise transition."""

from __future__ import annotations

import math

import pytest
import torch

from zerocon_core.diffuseit.start import DIFFUSEIT_START_SIGMA, noised_start, renoise, start_index
from zerocon_core.method.schedule import ddim_sigmas, sd_sigma_table

from .tiny import tiny_latent

D64 = torch.float64


def grid(steps=10):
    return ddim_sigmas(sd_sigma_table(), steps)


def test_renoise_is_the_exact_forward_transition():
    x = torch.zeros(20000, dtype=D64)
    out = renoise(x, 1.0, 2.0, torch.Generator().manual_seed(0))
    assert float(out.std()) == pytest.approx(math.sqrt(3.0), rel=0.02)
    with pytest.raises(ValueError):
        renoise(x, 2.0, 1.0, torch.Generator())


def test_noised_start_at_strength():
    sig = grid(50)
    x0 = tiny_latent(49)
    for strength, k in ((1.0, 0), (0.5, 25), (0.3, 35), (0.01, 49)):
        x, g = noised_start(x0, sig, strength, seed=5)
        assert start_index(sig, strength) == k
        assert torch.equal(g, sig[k:]) and len(g) - 1 == 50 - k
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32).to(D64)
        torch.testing.assert_close(x, x0 + sig[k] * noise, rtol=0, atol=1e-12)
    # default: DiffuseIT's noise level (sigma 5.98), the nearest level in log-sigma
    _, g = noised_start(x0, sig, None, seed=5)
    assert float(g[0]) == pytest.approx(6.197, abs=1e-3)
    assert abs(math.log(float(g[0]) / DIFFUSEIT_START_SIGMA)) < 0.05
    with pytest.raises(ValueError, match="strength"):
        noised_start(x0, sig, 0.0)
