"""``SamplerSettings.reuse_guidance_eps`` (opt-in, not the method): the CFG step of a guided step takes the edit's
noise from the guidance forward (at the latent before the gradient step) and runs the negative alone at the moved
latent. Checked against the noises recomputed here at the latents the sampler saw."""

from __future__ import annotations

import pytest
import torch

from zerocon_core.method.guidance import CrossAttentionGuidance, PatchNCEGuidance
from zerocon_core.method.sampler import SamplerSettings, cfg_combine, guided_ddim_sample
from zerocon_core.method.schedule import ddim_sigmas, vp_scale

from .tiny import tiny_cond, tiny_latent

TERMS = (CrossAttentionGuidance(weight=0.3), PatchNCEGuidance(weight=0.5, num_patches=8))


class Calls:
    """Wraps a denoiser and logs every forward: (grad enabled, conditionings, latent)."""

    def __init__(self, den) -> None:
        self.den, self.calls = den, []
        self.sigma_table, self.prediction_type = den.sigma_table, den.prediction_type

    def layers(self):
        return self.den.layers()

    def autograd_session(self):
        return self.den.autograd_session()

    def predict(self, x, sigma, conds, capture=None):
        self.calls.append((torch.is_grad_enabled(), list(conds), x.detach().clone()))
        return self.den.predict(x, sigma, conds, capture)


def run(den, steps, terms=TERMS, **settings):
    sig = ddim_sigmas(den.sigma_table, steps)
    x = tiny_latent(7) / vp_scale(sig[0])
    src, edit = tiny_cond(1), tiny_cond(2)
    res = guided_ddim_sample(
        den, x, sig, source_cond=src, edit_cond=edit, guidance=terms,
        settings=SamplerSettings(reference="resampled", **{"step_mode": "raw", **settings}),  # the measured figures are raw
    )  # fmt: skip
    return res, sig, src, edit


def test_one_step_uses_the_edit_noise_at_the_latent_before_the_gradient_step(den):
    calls = Calls(den)
    res, sig, src, edit = run(calls, 1, cfg=5.0, reuse_guidance_eps=True)
    grad = [c for c in calls.calls if c[0]]
    assert len(grad) == 1 and grad[0][1] == [edit]
    x_before = grad[0][2]
    no_grad = [c for c in calls.calls if not c[0]]  # the reference forward (at x_before), then the CFG forward
    assert [c[1] for c in no_grad] == [[src], [src]] and torch.equal(no_grad[0][2], x_before)
    x_moved = no_grad[1][2]
    assert float((x_moved - x_before).abs().max()) > 1e-6  # the guidance moved the latent
    with torch.no_grad():
        (p_neg,) = den.predict(x_moved, sig[0], [src])
        (p_edit,) = den.predict(x_before, sig[0], [edit])
    expected = x_moved + (sig[1] - sig[0]) * cfg_combine(p_neg.eps, p_edit.eps, 5.0)
    torch.testing.assert_close(res.latent, expected, rtol=0, atol=1e-12)


def test_steps_without_guidance_run_the_full_cfg_forward(den):
    terms = (CrossAttentionGuidance(weight=0.3, end=0.5),)
    calls = Calls(den)
    opt, *_ = run(calls, 4, terms, reuse_guidance_eps=True)
    batched = [c for c in calls.calls if not c[0] and len(c[1]) == 2]
    assert len(batched) == 2  # steps 2 and 3: no guidance forward to take the edit noise from
    exact, *_ = run(den, 4, terms)
    assert 0 < float((opt.latent - exact.latent).norm() / exact.latent.norm()) < 0.05


def test_the_cost_in_exactness(den):
    """What docs/benchmarks.md quotes: on the tiny random UNet (4 steps, cfg 5) the opt-in edit is 0.80 x the guidance's own
    effect (exact edit vs unguided edit) away from the exact edit: the edit noise no longer follows the moved
    latent, so the CFG noise's response to the guidance step is (1 - cfg) x the negative's instead of the edit's."""
    exact, *_ = run(den, 4)
    opt, *_ = run(den, 4, reuse_guidance_eps=True)
    unguided, *_ = run(den, 4, ())
    effect = float((exact.latent - unguided.latent).norm())
    gap = float((opt.latent - exact.latent).norm())
    assert gap / effect == pytest.approx(0.80, abs=0.01)


def test_reuse_guidance_eps_needs_the_edit_branches():
    with pytest.raises(ValueError, match="reuse_guidance_eps needs branches 'edit'"):
        SamplerSettings(branches="both", reuse_guidance_eps=True)
