"""The engine's loops on a tiny diffusers UNet: inversion round trip, guided steps, regularisation, failures."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch

from zerocon_core import losses as L
from zerocon_core.denoiser import CaptureRequest
from zerocon_core.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance, StepContext
from zerocon_core.inversion import NoiseRegularization, ddim_invert
from zerocon_core.sampler import GuidedStep, SamplerSettings, _guidance_step, guided_ddim_sample
from zerocon_core.schedule import ddim_sigmas, ddim_timesteps, inversion_sigmas, vp_scale

from .tiny import single_thread, tiny_cond, tiny_denoiser, tiny_latent


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def den():
    return tiny_denoiser("epsilon", seed=0)


@pytest.fixture(scope="module")
def den_v():
    return tiny_denoiser("v_prediction", seed=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- inversion round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ptype,seed", [("epsilon", 0), ("v_prediction", 1)])
def test_invert_then_sample_reconstructs(ptype, seed):
    """ "current"-mode inversion then plain DDIM sampling on the same grid returns to the start latent; the
    error is first order in the step (measured: eps 0.83, 0.55, 0.28; v 0.40, 0.12, 0.05 for 5, 20, 50
    steps; 0.16 for eps at 100), so it shrinks as steps grow. The UNet is made smooth in t as trained models
    are (tiny.smooth_in_time); a random UNet reads timestep-scale sinusoids and converges more slowly."""
    d = tiny_denoiser(ptype, seed=seed, smooth=True)
    cond = tiny_cond(1)
    z0 = tiny_latent(5)
    errs = []
    for steps in (5, 20, 50):
        sampling = ddim_sigmas(d.sigma_table, steps)
        up = inversion_sigmas(sampling)
        assert torch.equal(up, sampling.flip(0))  # final level is ab[0] > 0: nothing to replace
        x0 = z0 / vp_scale(up[0])
        inv = ddim_invert(d, x0, up, cond)
        out = guided_ddim_sample(
            d, inv.latent, sampling, source_cond=cond, edit_cond=cond, settings=SamplerSettings(cfg=1.0)
        )
        errs.append(rel_err(out.latent, x0))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.6 * errs[1], errs  # first order: 20 -> 50 steps should give about 0.4x


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


# -- regularised inversion ----------------------------------------------------------------------------------


def test_regularized_inversion_is_seeded(den):
    up = inversion_sigmas(ddim_sigmas(den.sigma_table, 4))
    x = tiny_latent(2) / vp_scale(up[0])
    cond = tiny_cond(1)
    reg = NoiseRegularization()
    a = ddim_invert(den, x, up, cond, regularization=reg, seed=3)
    b = ddim_invert(den, x, up, cond, regularization=reg, seed=3)
    c = ddim_invert(den, x, up, cond, regularization=reg, seed=4)
    plain = ddim_invert(den, x, up, cond)
    assert torch.isfinite(a.latent).all() and len(a.trajectory) == 5
    assert torch.equal(a.latent, b.latent)
    assert not torch.equal(a.latent, c.latent)
    assert not torch.allclose(a.latent, plain.latent)


def test_regularization_whitens_noise():
    """The regulariser lowers both of its losses on correlated, off-scale "noise"."""
    g = torch.Generator().manual_seed(0)
    eps = torch.nn.functional.avg_pool2d(torch.randn(1, 4, 66, 66, generator=g, dtype=torch.float64), 3, 1) * 2 + 0.3
    out = NoiseRegularization()(eps, torch.Generator().manual_seed(1))
    assert L.kl_loss(out) < L.kl_loss(eps)
    assert L.auto_corr_loss(out, torch.Generator().manual_seed(2)) < L.auto_corr_loss(
        eps, torch.Generator().manual_seed(2)
    )


@pytest.mark.parametrize("side", [8, 16, 64])
def test_auto_corr_random_shift_is_never_zero(side, monkeypatch):
    """A delta has zero circular auto-correlation at every shift except 0 (mod side), at every pyramid level
    (a 2x2-pooled delta is a delta): so the loss is exactly 0 unless some drawn shift is 0 - the
    pix2pix-zero bug fixed in ec33392. The drawn shifts themselves are recorded and checked too."""
    eps = torch.zeros(1, 4, side, side, dtype=torch.float64)
    eps[..., 0, 0] = 1.0
    assert float((eps * eps).mean() ** 2) > 0  # what a zero shift would add
    shifts: list[tuple[int, int]] = []
    real_roll = torch.roll

    def roll(t, shifts_, dims):
        shifts.append((int(shifts_), t.shape[dims]))
        return real_roll(t, shifts=shifts_, dims=dims)

    monkeypatch.setattr(L.torch, "roll", lambda t, shifts, dims: roll(t, shifts, dims))
    for seed in range(40):
        assert float(L.auto_corr_loss(eps, torch.Generator().manual_seed(seed))) == 0.0
    assert all(1 <= d < max(n // 2, 2) for d, n in shifts)
    if side == 64:
        assert {n for _, n in shifts} == {64, 32, 16, 8}
        assert len({d for d, n in shifts if n == 64}) > 10  # really random over [1, 32)


# -- steps -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, None])
def test_bad_step_counts(den, steps):
    with pytest.raises(ValueError, match="steps"):
        ddim_sigmas(den.sigma_table, steps)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(steps)


def test_step_count_edges(den):
    assert len(ddim_sigmas(den.sigma_table, 1)) == 2
    assert ddim_timesteps(1).tolist() == [1]
    assert len(ddim_sigmas(den.sigma_table, 999)) == 1000
    assert ddim_timesteps(999)[0] == 999
    with pytest.raises(ValueError, match="past the model's last"):  # offset 1: timestep 1000 does not exist
        ddim_sigmas(den.sigma_table, 1000)
    assert ddim_timesteps(1000, steps_offset=0)[0] == 999
    with pytest.raises(ValueError, match="cannot exceed"):
        ddim_sigmas(den.sigma_table, 1001)
