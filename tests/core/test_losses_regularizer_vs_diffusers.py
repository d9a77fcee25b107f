"""The noise regulariser's documented differences from diffusers' pix2pix-zero pipeline, each checked against
the pipeline's own ``kl_divergence`` / ``auto_corr_loss`` (they use no pipeline state, so they are called unbound)."""

from __future__ import annotations

import torch
from diffusers.pipelines.deprecated.stable_diffusion_variants.pipeline_stable_diffusion_pix2pix_zero import (
    StableDiffusionPix2PixZeroPipeline as P,
)

from zerocon_core.method import losses as L

D64 = torch.float64


def test_kl_is_per_image_where_diffusers_takes_the_whole_batch():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 4, 8, 8, generator=g, dtype=D64) * 0.5
    b = torch.randn(1, 4, 8, 8, generator=g, dtype=D64) * 2.0 + 0.3
    assert torch.allclose(L.kl_loss(a), P.kl_divergence(None, a), rtol=1e-12)  # batch 1: the same
    ours = L.kl_loss(torch.cat([a, b]))
    assert torch.allclose(ours, P.kl_divergence(None, a) + P.kl_divergence(None, b), rtol=1e-12)
    assert not torch.allclose(ours, P.kl_divergence(None, torch.cat([a, b])), rtol=1e-2)


def test_pyramid_follows_the_shorter_side_of_a_portrait_latent(monkeypatch):
    """On a (32 x 16) portrait latent we pool to 16 x 8 and stop; diffusers pools on to 8 x 4 (it watches the
    height) and draws the width's shifts up to half the height."""
    seen: list[tuple[int, int]] = []
    real_roll = torch.roll

    def roll(t, shifts, dims):
        seen.append(tuple(t.shape[-2:]))
        return real_roll(t, shifts=shifts, dims=dims)

    monkeypatch.setattr(torch, "roll", roll)
    eps = torch.randn(1, 1, 32, 16, generator=torch.Generator().manual_seed(1), dtype=D64)
    L.auto_corr_loss(eps, torch.Generator().manual_seed(0))
    ours, seen[:] = sorted(set(seen)), []
    P.auto_corr_loss(None, eps, torch.Generator().manual_seed(0))
    theirs = sorted(set(seen))
    assert ours == [(16, 8), (32, 16)]
    assert theirs == [(8, 4), (16, 8), (32, 16)]
