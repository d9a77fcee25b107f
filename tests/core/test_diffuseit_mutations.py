"""DiffuseIT's noise-blended estimate (zerocon_core.diffuseit.guidance, ``noise_blend``: its ``--use_noise_aug_all``).

With ``a = alpha_bar(sigma)`` and ``f = sqrt(1 - a)``, the DINO losses see the decoded
``f * x0_hat + (1 - f) * z_t``, where ``z_t = sqrt(a) * x`` is the VP latent of the current sample ``x``
(sigma space) and ``x0_hat = x - sigma * eps``; the range loss always sees ``x0_hat``. Recomputed here from
those formulas (docs/method.md §9); fails on swapped factors or on blending the sigma-space latent.
"""

from __future__ import annotations

import pytest
import torch

from zerocon_core.diffuseit.guidance import DinoStructureGuidance, RangeGuidance
from zerocon_core.method.denoiser import Prediction
from zerocon_core.method.guidance import StepContext
from zerocon_core.method.schedule import alpha_bar_from_sigma

from .tiny import rand_image, randn64
from .tiny_vision import tiny_dino


class Recorder(torch.nn.Module):
    """A decoder that records the latents it is given: 1x1 conv to RGB, x4 nearest upsampling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 3, 1).double().requires_grad_(False)
        self.seen: list[torch.Tensor] = []

    def forward(self, z):
        self.seen.append(z.detach().clone())
        return 0.5 + 0.1 * torch.nn.functional.interpolate(self.conv(z), scale_factor=4)


def context(x, eps, sigma):
    s = torch.tensor(sigma, dtype=torch.float64)
    return StepContext(0, 10, s, x, eps, Prediction(eps, {}, {}), None, torch.Generator(), s * 0.9)


@pytest.mark.parametrize("sigma", [6.0, 1.2, 0.2])
def test_noise_blend_mixes_the_clean_prediction_with_the_vp_latent(sigma):
    dino = tiny_dino(0).double()
    x, eps = randn64(1, 4, 8, 8, seed=1) * 3, randn64(1, 4, 8, 8, seed=2)
    x0 = x - sigma * eps
    a = alpha_bar_from_sigma(torch.tensor(sigma, dtype=torch.float64))
    f = (1 - a).sqrt()
    blended = f * x0 + (1 - f) * a.sqrt() * x
    for blend, want in ((True, blended), (False, x0)):
        dec = Recorder()
        term = DinoStructureGuidance(
            dino=dino, decode=dec, source=rand_image(3), dino_size=16, dino_max_size=None, noise_blend=blend
        )
        term.loss(context(x, eps, sigma), None)
        assert len(dec.seen) == 1
        torch.testing.assert_close(dec.seen[0], want, rtol=1e-12, atol=1e-12)
    dec = Recorder()
    RangeGuidance(decode=dec).loss(context(x, eps, sigma), None)  # the range loss: the clean prediction
    torch.testing.assert_close(dec.seen[0], x0, rtol=1e-12, atol=1e-12)
