"""How the three branches modes relate at one guidance step (cross-attention term, separate negative).

pix2pix-zero's update (checked against diffusers in test_sampler_pix2pix_zero.py) moves copy 0 by D0 = w/2 *
the negative half's gradient and copy 1 by D1 = w/2 * the edit half's. Then "both" (one latent, the loss
averaged over the halves) must move by D0 + D1, and "edit" (the edit half alone, not averaged) by 2 D1.
A mode that paired its halves with the wrong reference halves, or dropped the averaging, fails here.
"""

from __future__ import annotations

import pytest
import torch

from zerocon_core.method.guidance import CrossAttentionGuidance
from zerocon_core.method.sampler import GuidedStep, SamplerSettings, _guidance_step
from zerocon_core.method.schedule import ddim_sigmas, vp_scale

from .tiny import tiny_cond, tiny_denoiser, tiny_latent


@pytest.fixture(scope="module")
def den():
    return tiny_denoiser("epsilon", seed=0)


def test_both_and_edit_are_sums_of_the_pix2pix_zero_copies_moves(den):
    s = ddim_sigmas(den.sigma_table, 10)[4]
    x = tiny_latent(61) / vp_scale(s)
    src, neg, edit = tiny_cond(62), tiny_cond(63), tiny_cond(64)
    term = CrossAttentionGuidance(weight=0.3)
    req = term.request(den.layers())
    with torch.no_grad():  # the reference branch's halves at a nearby latent (negative, source)
        ref = den.predict(x + 0.2 * tiny_latent(65), s, [neg, src], req)

    def moved(branches: str):
        step = GuidedStep(den, 4, 10, s, None, [(term, req)], ref, neg, edit, torch.Generator().manual_seed(0))
        out = _guidance_step(x, step, SamplerSettings(branches=branches, step_mode="raw"))
        assert out.finite
        return out.latents

    copy0, copy1 = moved("pix2pix-zero")
    (both,) = moved("both")
    (alone,) = moved("edit")
    d0, d1 = x - copy0, x - copy1
    assert float(d0.norm()) > 1e-4 * float(x.norm()) and float(d1.norm()) > 1e-4 * float(x.norm())
    assert float((d0 - d1).norm()) > 0.1 * float(d1.norm())  # the halves really differ
    torch.testing.assert_close(x - both, d0 + d1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x - alone, 2 * d1, rtol=1e-9, atol=1e-12)
