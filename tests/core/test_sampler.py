"""The guided DDIM sampler (zerocon_core.method.sampler) on a tiny diffusers UNet: diffusers' ``DDIMScheduler``
without guidance (float64), guided steps, branches, step windows, non-finite gradients."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from diffusers import DDIMScheduler

from zerocon_core.method import losses as L
from zerocon_core.method.denoiser import CaptureRequest
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance, StepContext
from zerocon_core.method.sampler import GuidedStep, SamplerSettings, _guidance_step, guided_ddim_sample
from zerocon_core.method.schedule import ddim_sigmas, sigma_from_alpha_bar, vp_scale

from .tiny import f64, rel_err, sd_scheduler_config, tiny_cond, tiny_latent

# -- guided steps -------------------------------------------------------------------------------------------


def _setup(d, t=601):
    s = d.sigma_table[t]
    x = tiny_latent(11) / vp_scale(s)
    src, edit = tiny_cond(1), tiny_cond(2)
    return s, x, src, edit


def _loss(d, term, req, x, s, edit, ref, seed=0):
    (p,) = d.predict(x, s, [edit], req)
    ctx = StepContext(0, 10, s, x, p.eps, p, ref, torch.Generator().manual_seed(seed))
    return float(term.loss(ctx, req))


@pytest.mark.parametrize(
    "term",
    [
        CrossAttentionGuidance(weight=1.0),
        PatchNCEGuidance(weight=1.0, num_patches=16, layers="up"),
        PatchNCEGuidance(weight=1.0, num_patches=8, layers="all", patch_sizes=(1, 2)),
    ],
    ids=["xattn", "patchnce-up", "patchnce-all"],
)
@pytest.mark.parametrize("step_mode", ["raw", "normalized"])
def test_one_guided_step_lowers_the_loss(den, term, step_mode):
    """One guidance step on the edit latent lowers that term's loss (same PatchNCE sample indices)."""
    s, x, src, edit = _setup(den)
    req = term.request(den.layers())
    (ref,) = den.predict(x, s, [src], req)
    ref = ref._replace(
        probs={k: v.detach() for k, v in ref.probs.items()}, features={k: v.detach() for k, v in ref.features.items()}
    )
    before = _loss(den, term, req, x, s, edit, ref)
    assert before > 0
    if step_mode == "raw":  # pix2pix-zero's unnormalised SGD; choose the step size for this toy
        term = type(term)(**{**term.__dict__, "weight": 1e-3})
    gen = torch.Generator().manual_seed(0)
    step = GuidedStep(den, 0, 10, s, None, [(term, req)], [ref, ref], src, edit, gen)
    outcome = _guidance_step(x, step, SamplerSettings(step_mode=step_mode, step_size=1e-3))
    (x_new,) = outcome.latents
    after = _loss(den, term, req, x_new, s, edit, ref)
    assert not torch.equal(x_new, x)
    assert after < before, (before, after)
    assert outcome.finite and list(outcome.losses) == [type(term).__name__]


def test_raw_step_is_sgd_on_the_vp_latent(den):
    """raw mode: z <- z - w * grad_z L on the VP latent z = x * vp_scale(sigma) (pix2pix-zero's update)."""
    s, x, src, edit = _setup(den, t=801)
    term = CrossAttentionGuidance(weight=0.1)
    req = term.request(den.layers())
    (ref,) = den.predict(x + 0.1, s, [src], req)
    c = vp_scale(s)
    z = (x * c).detach().requires_grad_(True)
    (p,) = den.predict(z / c, s, [edit], req)
    loss = L.cross_attention_loss(p.probs, ref.probs)
    (gz,) = torch.autograd.grad(loss, z)
    expect = (z - 0.1 * gz).detach() / c
    step = GuidedStep(den, 0, 1, s, None, [(term, req)], [ref, ref], src, edit, torch.Generator())
    (x_new,) = _guidance_step(x, step, SamplerSettings(step_mode="raw", step_size=0.0)).latents
    assert torch.allclose(x_new, expect, rtol=1e-9, atol=1e-12)


def test_both_branches_and_window(den):
    """branches="both" runs; a term's window selects steps; the edit does not depend on keep_reference, and
    the reference is a plain DDIM reconstruction with the source conditioning."""
    sig = ddim_sigmas(den.sigma_table, 6)
    x = tiny_latent(3) / vp_scale(sig[0])
    src, edit = tiny_cond(1), tiny_cond(2)
    terms = (CrossAttentionGuidance(weight=0.05, start=0.5, end=1.0),)
    kw = dict(source_cond=src, edit_cond=edit, guidance=terms)
    a = guided_ddim_sample(den, x, sig, settings=SamplerSettings(cfg=3.0), **kw)
    b = guided_ddim_sample(den, x, sig, settings=SamplerSettings(cfg=3.0, keep_reference=True), **kw)
    assert torch.equal(a.latent, b.latent)
    assert [list(d) for d in a.losses] == [["CrossAttentionGuidance"]] * 3  # steps 3, 4, 5 of 6
    plain = guided_ddim_sample(den, x, sig, source_cond=src, edit_cond=src, settings=SamplerSettings(cfg=1.0))
    assert torch.allclose(b.reference, plain.latent, rtol=0, atol=1e-12)
    unguided = guided_ddim_sample(den, x, sig, source_cond=src, edit_cond=edit, settings=SamplerSettings(cfg=3.0))
    assert not torch.allclose(a.latent, unguided.latent)
    both = guided_ddim_sample(
        den, x, sig, settings=SamplerSettings(cfg=3.0, branches="both"), negative_cond=tiny_cond(3), **kw
    )
    assert torch.isfinite(both.latent).all() and len(both.losses) == 3


@dataclass(frozen=True)
class NaNGuidance(GuidanceTerm):
    """A term whose gradient is NaN (its loss multiplies eps by NaN)."""

    def loss(self, ctx: StepContext, request: CaptureRequest) -> torch.Tensor:
        return (ctx.eps * float("nan")).sum()


def test_non_finite_gradient_skips_the_step(den, caplog):
    sig = ddim_sigmas(den.sigma_table, 4)
    x = tiny_latent(3) / vp_scale(sig[0])
    src, edit = tiny_cond(1), tiny_cond(2)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        res = guided_ddim_sample(den, x, sig, source_cond=src, edit_cond=edit, guidance=(NaNGuidance(),))
    assert res.skipped == [0, 1, 2, 3]
    assert torch.isfinite(res.latent).all()
    assert "not finite" in caplog.text
    plain = guided_ddim_sample(den, x, sig, source_cond=src, edit_cond=edit)
    assert torch.equal(res.latent, plain.latent)  # skipped steps leave the latent untouched


# -- sampling -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair,cfg,steps",
    [("eps", 1.0, 10), ("eps", 5.0, 10), ("v", 1.0, 10), ("v", 5.0, 10), ("eps", 5.0, 50), ("v", 5.0, 30)],
    indirect=["pair"],
)
def test_sampling_matches_ddim_scheduler(pair, cfg, steps):
    """guided_ddim_sample without guidance terms is diffusers' DDIMScheduler (leading, offset 1, final
    alpha-bar ab[0]) with standard CFG ``uncond + cfg * (cond - uncond)`` on the model output."""
    den, ref, ptype = pair
    sch = f64(DDIMScheduler.from_config(sd_scheduler_config(ptype)))
    sch.set_timesteps(steps)
    sigmas = ddim_sigmas(den.sigma_table, steps)
    assert torch.equal(sigmas[:-1], den.sigma_table[sch.timesteps])
    assert float(sigmas[-1]) == float(sigma_from_alpha_bar(sch.final_alpha_cumprod))
    neg, pos, src = tiny_cond(7), tiny_cond(8), tiny_cond(9)
    z_t = tiny_latent(3)

    z = z_t.clone()
    emb = torch.cat([neg.embeds, pos.embeds])
    with torch.no_grad():
        for t in sch.timesteps:
            uncond, condo = ref(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
            z = sch.step(uncond + cfg * (condo - uncond), t, z).prev_sample

    res = guided_ddim_sample(
        den,
        z_t / vp_scale(sigmas[0]),
        sigmas,
        source_cond=src,
        edit_cond=pos,
        negative_cond=neg,
        settings=SamplerSettings(cfg=cfg),
    )
    assert res.reference is None and res.skipped == []
    assert rel_err(res.latent * vp_scale(sigmas[-1]), z) < 1e-5


def test_cfg_1_evaluates_the_edit_alone(pair):
    """At cfg 1 (Flux-dev's distilled guidance) the step's noise is the edit's: the negative is never evaluated for
    the CFG step (the reference branch still runs for the guidance), and the result does not depend on it."""
    den, _, _ = pair
    sigmas = ddim_sigmas(den.sigma_table, 4)
    x = tiny_latent(5) / vp_scale(sigmas[0])
    src, edit, other_neg = tiny_cond(1), tiny_cond(2), tiny_cond(3)
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(den, name)

        def predict(self, x, sigma, conds, capture=None):
            calls.append((torch.is_grad_enabled(), [id(c) for c in conds]))
            return den.predict(x, sigma, conds, capture)

    term = CrossAttentionGuidance(weight=0.1)
    settings = SamplerSettings(cfg=1.0, step_mode="raw", reference="resampled")
    res = guided_ddim_sample(Spy(), x, sigmas, source_cond=src, edit_cond=edit, guidance=(term,), settings=settings)
    cfg_calls = [ids for grad, ids in calls if not grad and id(edit) in ids]
    assert cfg_calls == [[id(edit)]] * 4, calls  # one edit-only forward per step, never [negative, edit]
    other = guided_ddim_sample(
        den, x, sigmas, source_cond=src, edit_cond=edit, negative_cond=other_neg, guidance=(term,), settings=settings
    )
    assert torch.equal(res.latent, other.latent) or rel_err(res.latent, other.latent) < 1e-12
