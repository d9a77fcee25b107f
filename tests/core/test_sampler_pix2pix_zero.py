"""branches="pix2pix-zero" is pix2pix-zero's own guided update, checked against diffusers'
``StableDiffusionPix2PixZeroPipeline.__call__`` in float64 on a tiny random UNet; plus the measured
difference of the "edit" and "both" modes from it (the figures docs/guide.md quotes)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from zerocon_core.diffusers_host.denoiser import TextCond
from zerocon_core.method.denoiser import CaptureRequest
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, StepContext
from zerocon_core.method.inversion import ddim_invert
from zerocon_core.method.sampler import SamplerSettings, cfg_combine, guided_ddim_sample
from zerocon_core.method.schedule import ddim_sigmas, inversion_sigmas, vp_scale

from .tiny import TEXT_DIM, TOKENS, tiny_cond, tiny_denoiser, tiny_latent
from .tiny_pix2pix_zero import pipeline_edit, pix2pix_zero_pipeline

STEPS = 10
CFG = 5.0


@pytest.fixture(scope="module")
def setup():
    """(denoiser, untouched UNet copy, caption, edit direction, grid, inverted x_T in sigma space)."""
    den, unet = tiny_denoiser("epsilon", seed=0, keep_copy=True)
    unet.requires_grad_(False)
    caption = tiny_cond(1)
    delta = 0.5 * torch.randn(1, TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigmas = ddim_sigmas(den.sigma_table, STEPS)
    up = inversion_sigmas(sigmas)
    x_t = ddim_invert(den, tiny_latent(3) / vp_scale(up[0]), up, caption, eval_at="next").latent
    return den, unet, caption, delta, sigmas, x_t


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def pipeline(setup, weight: float, negative=None) -> torch.Tensor:
    den, unet, caption, delta, sigmas, x_t = setup
    pipe = pix2pix_zero_pipeline(copy.deepcopy(unet))  # the pipeline swaps the UNet's attention processors
    neg = None if negative is None else negative.embeds
    return pipeline_edit(pipe, x_t * vp_scale(sigmas[0]), caption.embeds, delta, STEPS, CFG, weight, neg)


def ours(setup, weight: float, branches: str, negative=None) -> torch.Tensor:
    den, unet, caption, delta, sigmas, x_t = setup
    terms = (CrossAttentionGuidance(weight=weight),) if weight > 0 else ()
    res = guided_ddim_sample(
        den,
        x_t,
        sigmas,
        source_cond=caption,
        edit_cond=TextCond(caption.embeds + delta),
        negative_cond=negative,
        guidance=terms,
        settings=SamplerSettings(cfg=CFG, branches=branches, step_mode="raw"),
    )
    return res.latent * vp_scale(sigmas[-1])


@pytest.mark.parametrize(
    "weight,negative",
    [(0.1, None), (1.0, None), (1.0, 9)],
    ids=["w0.1-caption-negative", "w1-caption-negative", "w1-separate-negative"],
)
def test_pix2pix_zero_mode_is_the_diffusers_pipeline(setup, weight, negative):
    """Cross-attention guidance only, CFG 5 (the caption as negative, or a separate negative whose reference
    half follows the CFG reference trajectory as the pipeline's does): equal to ``__call__`` within 1e-6,
    at weights where the guidance moves the result by more than 1%."""
    neg = None if negative is None else tiny_cond(negative)
    expect = pipeline(setup, weight, neg)
    unguided = pipeline(setup, 0.0, neg)
    assert rel(expect, unguided) > 0.01  # the guidance matters at this weight
    assert rel(ours(setup, 0.0, "pix2pix-zero", neg), unguided) < 1e-10
    assert rel(ours(setup, weight, "pix2pix-zero", neg), expect) < 1e-6


# -- the figures the documentation quotes ----------------------------------------------------------------------

#: distance of each mode's edit from the pipeline's, in units of the pipeline's whole guidance effect
#: |ours - pipe(w)| / |pipe(w) - pipe(0)|, at cross-attention weight 0.1 (pix2pix-zero's default) and 1.
MEASURED = {
    0.1: {"edit": 0.97, "both": 0.92},
    1.0: {"edit": 0.92, "both": 0.88},
}
#: the length of each mode's own guidance effect relative to pix2pix-zero's (same weight)
MEASURED_LENGTH = {"edit": 1.7, "both": 1.7}


@pytest.mark.parametrize("weight", sorted(MEASURED))
def test_measured_difference_of_the_modes(setup, weight):
    """The figures of docs/guide.md: "edit" and "both" are structurally different from pix2pix-zero (their edit is
    about as far from pix2pix-zero's as pix2pix-zero's is from the unguided edit), and each moves the latent
    about 1.7x as far as pix2pix-zero at the same weight, in a similar direction (cosine ~0.9)."""
    expect, unguided = pipeline(setup, weight), pipeline(setup, 0.0)
    effect = (expect - unguided).flatten()
    assert rel(ours(setup, weight, "pix2pix-zero"), expect) < 1e-6
    for mode, figure in MEASURED[weight].items():
        got = ours(setup, weight, mode)
        distance = float((got - expect).norm() / effect.norm())
        own = (got - ours(setup, 0.0, mode)).flatten()
        length = float(own.norm() / effect.norm())
        cosine = float(own @ effect / (own.norm() * effect.norm()))
        assert distance == pytest.approx(figure, abs=0.03), (mode, distance)
        assert length == pytest.approx(MEASURED_LENGTH[mode], abs=0.1), (mode, length)
        assert 0.85 < cosine < 0.95, (mode, cosine)


# -- other terms: the same two-copy update -------------------------------------------------------------------


@dataclass(frozen=True)
class CleanTarget(GuidanceTerm):
    """A capture-free term: mean squared distance of the predicted clean latent from a fixed target."""

    target: torch.Tensor | None = None

    def loss(self, ctx: StepContext, request: CaptureRequest) -> torch.Tensor:
        return (ctx.x0 - self.target).pow(2).mean()


def test_any_term_moves_each_copy_by_its_own_half(setup):
    """One step with a capture-free term, computed by hand on the bare UNet in VP space: copy c (negative /
    edit) takes ``z_c - w/2 * grad L_c(z_c)``, the CFG noise is negative(copy 0) + cfg (edit(copy 1) -
    negative(copy 0)), and the DDIM step starts from copy 0. "both" (one latent) gives another result."""
    den, unet, caption, delta, sigmas, _ = setup
    edit, neg = TextCond(caption.embeds + delta), tiny_cond(9)
    s, s_next = sigmas[3], sigmas[4]
    t = int(den.timestep(s))
    x = tiny_latent(21) / vp_scale(s)
    target = tiny_latent(22)
    w = 0.7
    term = CleanTarget(weight=w, target=target)

    c = vp_scale(s)
    z = x * c
    moved = []
    for cond in (neg, edit):
        zc = z.clone().requires_grad_(True)
        eps = unet(zc, t, encoder_hidden_states=cond.embeds).sample
        loss = w * ((zc / c - s * eps) - target).pow(2).mean() / 2  # averaged over the two copies
        (g,) = torch.autograd.grad(loss, zc)
        moved.append((zc - g).detach())
    with torch.no_grad():
        e_neg = unet(moved[0], t, encoder_hidden_states=neg.embeds).sample
        e_edit = unet(moved[1], t, encoder_hidden_states=edit.embeds).sample
    eps = cfg_combine(e_neg, e_edit, CFG)
    x_next = moved[0] / c + (s_next - s) * eps  # DDIM in sigma space from copy 0

    kw = dict(source_cond=caption, edit_cond=edit, negative_cond=neg, guidance=(term,))
    res = guided_ddim_sample(den, x, sigmas[3:5], settings=SamplerSettings(cfg=CFG, branches="pix2pix-zero"), **kw)
    assert rel(res.latent, x_next) < 1e-10
    both = guided_ddim_sample(
        den, x, sigmas[3:5], settings=SamplerSettings(cfg=CFG, branches="both", step_mode="raw"), **kw
    )
    assert rel(both.latent, x_next) > 1e-3
