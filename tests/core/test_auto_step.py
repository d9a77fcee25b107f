"""Step mode "auto" (zerocon_core.method.sampler): per-term RMS-normalised gradients mixed by unitless ratios, the
update a fraction of the latent's RMS; the overflow rescale-and-retry; float32 losses and update.

The expected auto update is written out here in float64 from the terms' own gradients (autograd on the VP
latent, the PatchNCE locations drawn from the same seed), not from the sampler's helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from zerocon_core.method.denoiser import CaptureRequest
from zerocon_core.method.diagnostics import summarize, summary
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance, StepContext
from zerocon_core.method.sampler import (
    RETRY_SCALE,
    GuidedStep,
    SamplerSettings,
    _guidance_step,
    guided_ddim_sample,
)
from zerocon_core.method.schedule import ddim_sigmas, vp_scale

from .tiny import rel_err, tiny_cond, tiny_latent

NCE = dict(num_patches=16, layers="up")


@dataclass(frozen=True)
class Steeper(GuidanceTerm):
    """``inner``'s loss times ``factor``: a model whose gradients for this term are ``factor`` times steeper."""

    inner: GuidanceTerm | None = None
    factor: float = 10.0

    def request(self, layers):
        return self.inner.request(layers)

    def loss(self, ctx: StepContext, request: CaptureRequest) -> torch.Tensor:
        return self.factor * self.inner.loss(ctx, request)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean().sqrt()


def _step_setup(den, batch: int = 2, t: int = 601):
    s = den.sigma_table[t]
    x = tiny_latent(11, batch=batch) / vp_scale(s)
    src, edit = tiny_cond(1, batch=batch), tiny_cond(2, batch=batch)
    return s, x, src, edit


def _ref(den, x, s, src, req):
    with torch.no_grad():
        (ref,) = den.predict(x + 0.05, s, [src], req)
    return ref


@pytest.mark.parametrize("ratios", [(1.0, 1.0), (1.0, 2.0), (2.0, 0.5)])
def test_auto_update_is_the_normalised_mix(den, ratios):
    """z <- z - f rms(z_b) d_b / rms(d_b), d = sum_k r_k g_k / rms(g_k), per image b (float64, independent)."""
    f = 0.03
    s, x, src, edit = _step_setup(den)
    terms = [CrossAttentionGuidance(weight=ratios[0]), PatchNCEGuidance(weight=ratios[1], **NCE)]
    layers = den.layers()
    reqs = [t.request(layers) for t in terms]
    merged = reqs[0] | reqs[1]
    ref = _ref(den, x, s, src, merged)

    c = vp_scale(s)
    z = (x * c).detach().requires_grad_(True)
    (p,) = den.predict(z / c, s, [edit], merged)
    gen = torch.Generator().manual_seed(5)
    grads = []
    for term, req in zip(terms, reqs):
        ctx = StepContext(0, 10, s, z / c, p.eps, p, ref, gen)
        (g,) = torch.autograd.grad(term.loss(ctx, req), z, retain_graph=True)
        grads.append(g)
    expect = []
    for b in range(x.shape[0]):
        d = sum(r * g[b] / _rms(g[b]) for r, g in zip(ratios, grads))
        expect.append(z[b] - f * _rms(z[b]) * d / _rms(d))
    expect = (torch.stack(expect) / c).detach()

    step = GuidedStep(
        den, 0, 10, s, None, list(zip(terms, reqs)), [ref, ref], src, edit, torch.Generator().manual_seed(5)
    )
    out = _guidance_step(x, step, SamplerSettings(step_mode="auto", step_size=f))
    (x_new,) = out.latents
    assert out.finite and rel_err(x_new, expect) < 1e-9, rel_err(x_new, expect)
    # the update's RMS is f x the latent's RMS, image by image (VP latent)
    for b in range(x.shape[0]):
        assert float(_rms((x[b] - x_new[b]) * c) / _rms(x[b] * c)) == pytest.approx(f, rel=1e-9)
    rec = out.record
    assert rec.update == pytest.approx(f, rel=1e-9) and not rec.retried and not rec.skipped
    assert rec.weights == {"CrossAttentionGuidance": ratios[0], "PatchNCEGuidance": ratios[1]}
    # each term's share of the update is its ratio (the unit gradients have RMS 1)
    assert rec.pulls["PatchNCEGuidance"] / rec.pulls["CrossAttentionGuidance"] == pytest.approx(
        ratios[1] / ratios[0], rel=1e-9
    )
    for name, g in zip(rec.grad_rms, grads):
        assert rec.grad_rms[name] == pytest.approx(float(_rms(g)), rel=1e-9)


def _sample(den, terms, mode, steps=4, **kw):
    sig = ddim_sigmas(den.sigma_table, steps)
    x = tiny_latent(3) / vp_scale(sig[0])
    settings = SamplerSettings(cfg=3.0, step_mode=mode, seed=2, **{"step_size": 0.02, **kw})
    return guided_ddim_sample(
        den, x, sig, source_cond=tiny_cond(1), edit_cond=tiny_cond(2), guidance=terms, settings=settings
    )


def test_auto_is_invariant_to_a_10x_steeper_term(den):
    """PatchNCE's loss x10 (a model whose PatchNCE gradients are 10x steeper): the same auto edit; raw moves."""
    xa = CrossAttentionGuidance(weight=1.0)
    nce = PatchNCEGuidance(weight=1.0, **NCE)
    plain = _sample(den, (xa, nce), "auto")
    steep = _sample(den, (xa, Steeper(weight=1.0, inner=nce, factor=10.0)), "auto")
    unguided = _sample(den, (), "auto")
    assert rel_err(plain.latent, unguided.latent) > 1e-3  # the guidance does something
    assert rel_err(steep.latent, plain.latent) < 1e-9, rel_err(steep.latent, plain.latent)
    # the recorded loss is 10x, the pull the same
    assert steep.records[0].losses["Steeper"] == pytest.approx(10 * plain.records[0].losses["PatchNCEGuidance"])

    raw_xa, raw_nce = CrossAttentionGuidance(weight=0.1), PatchNCEGuidance(weight=0.5, **NCE)
    raw = _sample(den, (raw_xa, raw_nce), "raw")
    raw_steep = _sample(den, (raw_xa, Steeper(weight=0.5, inner=raw_nce, factor=10.0)), "raw")
    moved = rel_err(raw.latent, unguided.latent)
    assert rel_err(raw_steep.latent, raw.latent) > 3 * moved  # a fixed weight blows up


def test_ratio_zero_is_no_pull_and_ratios_set_the_mix(den):
    xa = CrossAttentionGuidance(weight=1.0)
    alone = _sample(den, (xa,), "auto")
    with_zero = _sample(den, (xa, PatchNCEGuidance(weight=0.0, **NCE)), "auto")
    assert torch.equal(alone.latent, with_zero.latent)
    one = _sample(den, (xa, PatchNCEGuidance(weight=1.0, **NCE)), "auto")
    two = _sample(den, (xa, PatchNCEGuidance(weight=2.0, **NCE)), "auto")
    assert rel_err(one.latent, two.latent) > 1e-4
    assert summarize(one).pulls["PatchNCEGuidance"] == pytest.approx(1.0, rel=1e-9)
    assert summarize(two).pulls["PatchNCEGuidance"] == pytest.approx(2.0, rel=1e-9)
    # the total step stays step_size of the latent's RMS whatever the mix
    for res in (alone, one, two):
        assert [r.update for r in res.records] == pytest.approx([0.02] * 4, rel=1e-9)


def test_a_term_with_zero_gradient_adds_nothing(den):
    """A term with nothing to correct (exactly zero gradient) is not blown up by the normalisation."""

    @dataclass(frozen=True)
    class Flat(GuidanceTerm):
        def loss(self, ctx, request):
            return (ctx.x * 0).sum()

    xa = CrossAttentionGuidance(weight=1.0)
    alone = _sample(den, (xa,), "auto")
    flat = _sample(den, (xa, Flat(weight=1.0)), "auto")
    assert rel_err(flat.latent, alone.latent) < 1e-12
    assert flat.records[0].pulls["Flat"] == 0.0


# -- overflow: rescale and retry -------------------------------------------------------------------------------


class HalfBackward(torch.autograd.Function):
    """Identity whose backward passes the incoming gradient through float16 (inf above 65504), as a
    half-precision UNet's backward does; ``always`` makes it inf whatever the scale."""

    @staticmethod
    def forward(ctx, x, always: bool):
        ctx.always = always
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.always:
            return torch.full_like(g, float("inf")), None
        return g.half().to(g.dtype), None


@dataclass(frozen=True)
class Overflowing(GuidanceTerm):
    """``A/2 sum(x^2)``, its gradient ``A x``, with ``x`` read as ``M * HalfBackward(x / M)``: the gradient
    passes float16 at ``M A x``, so it overflows at scale 1 (M A 1e5) while the result ``A x`` may be small,
    as inside a half-precision UNet."""

    amplitude: float = 1e5
    inner: float = 1.0
    always: bool = False
    half: bool = True

    def loss(self, ctx, request):
        y = HalfBackward.apply(ctx.x / self.inner, self.always) * self.inner if self.half else ctx.x
        return self.amplitude * y.pow(2).sum() / 2


@pytest.mark.parametrize("mode", ["auto", "raw"])
def test_overflow_is_rescaled_and_retried_not_skipped(den, mode):
    weight, inner = (1.0, 1.0) if mode == "auto" else (1e-9, 1e9)  # raw: the step is w A x = 1e-4 x
    res = _sample(den, (Overflowing(weight=weight, inner=inner),), mode)
    exact = _sample(den, (Overflowing(weight=weight, inner=inner, half=False),), mode)
    assert res.skipped == [] and all(r.retried and not r.skipped for r in res.records)
    assert not any(r.retried for r in exact.records)
    assert rel_err(res.latent, exact.latent) < 1e-3  # float16 rounding of the rescaled gradient
    assert torch.isfinite(res.latent).all()
    assert "rescaled and retried at 4 step(s): 0, 1, 2, 3" in summary(res) and "WARNING" not in summary(res)
    assert 65504 * RETRY_SCALE < 1  # the retry makes a gradient of up to 65504 / RETRY_SCALE representable


def test_overflow_that_persists_skips_the_step_and_warns(den):
    res = _sample(den, (Overflowing(weight=1.0, always=True),), "auto")
    plain = _sample(den, (), "auto")
    assert res.skipped == [0, 1, 2, 3] and all(r.retried and r.skipped for r in res.records)
    assert torch.equal(res.latent, plain.latent) and torch.isfinite(res.latent).all()
    text = summary(res)
    assert text.startswith("guidance applied at 0/4 steps (step mode auto)")
    assert "WARNING: the guidance was skipped at 4 of 4 steps" in text and "bf16 or fp32" in text


def test_losses_and_update_are_float32_for_a_half_precision_latent(den):
    """A bfloat16 latent: the update is computed in float32 and cast back: it equals the float32 step cast to
    bfloat16 (a bfloat16 update would round the gain and the subtraction)."""
    s, x, src, edit = _step_setup(den, batch=1)
    term = Overflowing(weight=1.0, amplitude=1.0, half=False)
    step = GuidedStep(den, 0, 10, s, None, [(term, CaptureRequest())], None, src, edit, torch.Generator())
    settings = SamplerSettings(step_mode="auto", step_size=0.05)
    x16 = x.to(torch.bfloat16)
    out = _guidance_step(x16, step, settings)
    (x_new,) = out.latents
    assert x_new.dtype == torch.bfloat16
    x32 = x16.float()
    expect = x32 - 0.05 * _rms(x32) * x32 / _rms(x32)  # grad of |x|^2/2 is x: the step shrinks x by 5 % of RMS
    assert torch.equal(x_new, expect.to(torch.bfloat16))
    assert isinstance(out.record.losses["Overflowing"], float) and out.record.update == pytest.approx(0.05, rel=1e-6)


def test_unresolved_auto_weight_is_refused(den):
    with pytest.raises(ValueError, match=r"CrossAttentionGuidance has an unresolved auto weight \(-1\)"):
        _sample(den, (CrossAttentionGuidance(weight=-1.0),), "auto")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet_is_guided_at_every_step(dtype):
    """A float16 / bfloat16 UNet (CPU): finite output, the guidance applied at every step, the auto update
    exactly step_size of the latent's RMS (the update is float32 whatever the UNet's dtype)."""
    from .tiny import tiny_denoiser

    den = tiny_denoiser("epsilon", dtype=dtype)
    sig = ddim_sigmas(den.sigma_table, 6).float()
    x = tiny_latent(3, dtype=torch.float32) / vp_scale(sig[0])
    terms = (CrossAttentionGuidance(weight=1.0), PatchNCEGuidance(weight=1.0, **NCE))
    res = guided_ddim_sample(
        den,
        x,
        sig,
        source_cond=tiny_cond(1, dtype=dtype),
        edit_cond=tiny_cond(2, dtype=dtype),
        guidance=terms,
        settings=SamplerSettings(step_size=0.02),
    )
    assert torch.isfinite(res.latent).all() and res.skipped == []
    assert summary(res).startswith("guidance applied at 6/6 steps (step mode auto); mean update 2.0% of the latent")
    assert [r.update for r in res.records] == pytest.approx([0.02] * 6, rel=1e-5)


@pytest.mark.parametrize("branches", ["edit", "both", "pix2pix-zero"])
def test_auto_runs_on_every_branches_mode(den, branches):
    """Auto on each branches mode (pix2pix-zero: the two copies normalised together): the update is step_size
    of the latent's RMS at every step and the result differs from the unguided one."""
    terms = (CrossAttentionGuidance(weight=1.0), PatchNCEGuidance(weight=1.0, **NCE))
    res = _sample(den, terms, "auto", branches=branches)
    assert torch.isfinite(res.latent).all() and res.skipped == []
    assert [r.update for r in res.records] == pytest.approx([0.02] * 4, rel=1e-9)
    assert rel_err(res.latent, _sample(den, (), "auto", branches=branches).latent) > 1e-3
