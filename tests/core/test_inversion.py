"""DDIM inversion (zerocon_core.method.inversion): diffusers' ``DDIMInverseScheduler`` in both query conventions
(float64, tiny random UNets), the invert-then-sample round trip, and the noise regulariser.

Latents are compared in VP space: ``z = x * vp_scale(sigma)``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler

from zerocon_core.method import losses as L
from zerocon_core.method.inversion import NoiseRegularization, ddim_invert
from zerocon_core.method.sampler import SamplerSettings, guided_ddim_sample
from zerocon_core.method.schedule import ddim_sigmas, inversion_sigmas, sigma_from_alpha_bar, vp_scale

from .tiny import f64, rel_err, sd_scheduler_config, tiny_cond, tiny_denoiser, tiny_latent

# -- inversion ----------------------------------------------------------------------------------------------


def inverse_grid(inv: DDIMInverseScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """How diffusers' inverse grid maps onto ours.

    ``DDIMInverseScheduler.step(out, t, z)`` moves ``z`` from alpha-bar level ``t - r`` (r = T // steps;
    ``initial_alpha_cumprod`` when ``t - r < 0``) up to level ``t``. With leading spacing and offset 1
    the timesteps are 1, 1 + r, ..., so the levels visited are
    ``[initial_alpha_cumprod, ab[1], ab[1 + r], ..., ab[1 + (steps-1) r]]``: steps + 1 sigmas, ascending.
    Returns (sigma grid, the source timestep of each step: where the "current" convention queries the model).
    """
    ts = inv.timesteps.tolist()
    r = inv.config.num_train_timesteps // inv.num_inference_steps
    levels = [inv.initial_alpha_cumprod] + [inv.alphas_cumprod[t] for t in ts]
    for k, t in enumerate(ts):  # step k goes from level k to level k + 1
        src = t - r
        assert (src < 0 and k == 0) or src == ts[k - 1]
    sources = [0] + ts[:-1]  # level 0 is ab[0] (set_alpha_to_one=False): timestep 0
    return sigma_from_alpha_bar(torch.stack(levels).double()), torch.tensor(sources)


@pytest.mark.parametrize("pair,steps", [("eps", 10), ("v", 10), ("eps", 50)], indirect=["pair"])
def test_inversion_next_matches_ddim_inverse_scheduler(pair, steps):
    """eval_at="next" is diffusers' DDIMInverseScheduler loop: the UNet sees the current VP latent with the
    *next* timestep. Exact for eps models; for v models diffusers converts v to eps with the *source* level's
    alpha while we use the level the model was queried at, so v is checked against explicit formulas."""
    den, ref, ptype = pair
    inv = f64(DDIMInverseScheduler.from_config(sd_scheduler_config(ptype)))
    inv.set_timesteps(steps)
    sigmas, _ = inverse_grid(inv)
    assert torch.equal(sigmas[1:], den.sigma_table[inv.timesteps])
    cond = tiny_cond(1)
    z0 = tiny_latent(0)

    z = z0.clone()
    with torch.no_grad():
        for k, t in enumerate(inv.timesteps):
            out = ref(z, t, encoder_hidden_states=cond.embeds).sample
            if ptype == "epsilon":
                z = inv.step(out, t, z).prev_sample
            else:  # v -> eps at the level the model was queried at (t), then the same DDIM update
                ab_q = inv.alphas_cumprod[t]
                eps = ab_q.sqrt() * out + (1 - ab_q).sqrt() * z
                ab_a = 1 / (1 + sigmas[k] ** 2)
                x0 = (z - (1 - ab_a).sqrt() * eps) / ab_a.sqrt()
                z = ab_q.sqrt() * x0 + (1 - ab_q).sqrt() * eps

    res = ddim_invert(den, z0 / vp_scale(sigmas[0]), sigmas, cond, eval_at="next")
    assert len(res.trajectory) == steps + 1
    assert rel_err(res.latent * vp_scale(sigmas[-1]), z) < 1e-5


def test_inversion_current_matches_ddim_inverse_scheduler(pair):
    """eval_at="current" is DDIMInverseScheduler's update with the UNet queried at the step's source level
    (the latent's own level), for eps and v alike: there diffusers' v conversion uses the queried level too."""
    den, ref, ptype = pair
    inv = f64(DDIMInverseScheduler.from_config(sd_scheduler_config(ptype)))
    inv.set_timesteps(10)
    sigmas, sources = inverse_grid(inv)
    cond = tiny_cond(1)
    z0 = tiny_latent(0)
    z = z0.clone()
    with torch.no_grad():
        for t, t_src in zip(inv.timesteps, sources):
            out = ref(z, t_src, encoder_hidden_states=cond.embeds).sample
            z = inv.step(out, t, z).prev_sample
    res = ddim_invert(den, z0 / vp_scale(sigmas[0]), sigmas, cond, eval_at="current")
    assert rel_err(res.latent * vp_scale(sigmas[-1]), z) < 1e-5


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


def test_unknown_convention_is_refused_before_any_forward(den):
    """``ddim_invert`` checks ``eval_at`` with the same rule as ``EditOptions`` (``inversion.check_eval_at``)."""
    sigmas = inversion_sigmas(ddim_sigmas(den.sigma_table, 4))
    with pytest.raises(ValueError, match=r"^eval_at must be one of current, next, got 'sideways'$"):
        ddim_invert(den, tiny_latent(0), sigmas, tiny_cond(1), eval_at="sideways")
