"""DiffuseIT's guidance terms and sampling (zerocon_core.diffuseit.guidance): gradients, sharing, batches, the sampler.

Models are tiny and random: a DINO-layout ViT (``tiny_vision.tiny_dino``, patch 8, 32 wide), a fixed random
conv + upsampling "decoder" (latent (B, 4, h, w) -> image (B, 3, 4h, 4w)) and the tiny diffusers UNet
(``tiny.tiny_denoiser``). DINO runs at small sizes (``dino_size`` 16-32 px) except where 785 tokens matter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zerocon_core.diffuseit.dino import dino_features
from zerocon_core.diffuseit.guidance import (
    DinoStructureGuidance,
    DinoStyleGuidance,
    RangeGuidance,
    SemanticDivergenceGuidance,
    diffuseit_guidance,
    diffuseit_sample,
    posterior_step_scale,
)
from zerocon_core.diffuseit.losses import (
    cls_loss,
    key_contrastive_loss,
    pixel_mse_loss,
    range_loss,
    self_similarity_loss,
    semantic_divergence_loss,
)
from zerocon_core.diffuseit.start import noised_start
from zerocon_core.method.denoiser import Prediction
from zerocon_core.method.guidance import StepContext
from zerocon_core.method.sampler import SamplerSettings, guided_ddim_sample
from zerocon_core.method.schedule import alpha_bar_from_sigma, ddim_sigmas, sd_sigma_table

from .tiny import rand_image, randn64, tiny_cond, tiny_latent
from .tiny_vision import tiny_dino

D64 = torch.float64


class TinyDecoder(torch.nn.Module):
    """A fixed random decoder: 3x3 conv to RGB, x4 bilinear upsampling, ``0.5 + 0.25 * .`` (not clamped)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = D64):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1).to(dtype)
        self.requires_grad_(False)
        self.calls = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.5 + 0.25 * F.interpolate(self.conv(z), scale_factor=4, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def dino():
    return tiny_dino(seed=0).double()


# -- guidance terms -------------------------------------------------------------------------------------------


def ctx_for(x, eps_fn, sigma=6.0, sigma_next=5.5, state=None):
    """A StepContext whose eps is ``eps_fn(x)`` (differentiable), as the sampler builds it."""
    eps = eps_fn(x)
    pred = Prediction(eps, {}, {})
    kwargs = {} if state is None else {"state": state}
    return StepContext(
        0,
        10,
        torch.tensor(sigma, dtype=D64),
        x,
        eps,
        pred,
        None,
        torch.Generator(),
        torch.tensor(sigma_next, dtype=D64),
        **kwargs,
    )


def test_term_gradcheck_through_decoder_and_dino(dino):
    dec = TinyDecoder()
    src = rand_image(22, h=16, w=16)
    term = DinoStructureGuidance(dino=dino, decode=dec, source=src, dino_size=16, dino_max_size=None)
    style = DinoStyleGuidance(
        dino=dino, decode=dec, reference=rand_image(23, h=24, w=24), dino_size=16, dino_max_size=None
    )
    x = randn64(1, 4, 4, 4, seed=24).requires_grad_(True)

    def f(t):
        ctx = ctx_for(t, lambda v: 0.1 * torch.tanh(v))
        return term.loss(ctx, None) + style.loss(ctx, None)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_term_losses_equal_the_pure_losses(dino):
    dec = TinyDecoder()
    src, ref = rand_image(25, h=32, w=32), rand_image(26, h=40, w=24)
    x = randn64(2, 4, 8, 8, seed=27)
    ctx = ctx_for(x, lambda v: 0.05 * v)
    scale = posterior_step_scale(6.0, 5.5)
    img = dec(ctx.x0)
    out = dino_features(dino, img, 32, None)
    src_f = dino_features(dino, src, 32, None)
    ref_f = dino_features(dino, ref, 32, None)

    st = DinoStructureGuidance(dino=dino, decode=dec, source=src, dino_size=32, dino_max_size=None)
    expect = 1000 * self_similarity_loss(out.keys, src_f.keys) + 200 * key_contrastive_loss(out.keys, src_f.keys)
    assert float(st.loss(ctx, None)) == pytest.approx(float(expect) * scale, rel=1e-10)

    sty = DinoStyleGuidance(dino=dino, decode=dec, reference=ref, dino_size=32, dino_max_size=None)
    expect = 2000 * cls_loss(out.cls, ref_f.cls) + 3000 * pixel_mse_loss(img, ref)
    assert float(sty.loss(ctx, None)) == pytest.approx(float(expect) * scale, rel=1e-10)

    rng = RangeGuidance(decode=dec, posterior_scale=False)
    assert float(rng.loss(ctx, None)) == pytest.approx(200 * float(range_loss(img)), rel=1e-12)


def test_terms_share_one_decode_and_dino_forward_per_evaluation(dino):
    dec = TinyDecoder()
    src = rand_image(28)
    terms = diffuseit_guidance(dino, dec, src, reference=rand_image(29), dino_size=32, dino_max_size=None)
    assert [type(t).__name__ for t in terms] == [
        "DinoStructureGuidance",
        "DinoStyleGuidance",
        "SemanticDivergenceGuidance",
        "RangeGuidance",
    ]
    state: dict = {}
    x = randn64(1, 4, 8, 8, seed=30).requires_grad_(True)
    ctx = ctx_for(x, lambda v: 0.05 * v, state=state)
    total = sum(t.loss(ctx, None) for t in terms)
    assert dec.calls == 1
    (g,) = torch.autograd.grad(total, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # a new evaluation (new x) decodes again
    x2 = x.detach().clone().requires_grad_(True)
    terms[0].loss(ctx_for(x2, lambda v: 0.05 * v, state=state), None)
    assert dec.calls == 2


def test_reference_and_source_batches(dino):
    dec = TinyDecoder()
    x = randn64(3, 4, 8, 8, seed=31)
    ctx = ctx_for(x, lambda v: 0.05 * v)
    bad = DinoStyleGuidance(dino=dino, decode=dec, reference=rand_image(32, b=2), dino_size=32)
    with pytest.raises(ValueError, match="3 image.*reference image has batch 2"):
        bad.loss(ctx, None)
    bad_src = DinoStructureGuidance(dino=dino, decode=dec, source=rand_image(33, b=2), dino_size=32)
    with pytest.raises(ValueError, match="3 image.*source image has batch 2"):
        bad_src.loss(ctx, None)
    # a batch-1 reference is shared: the loss is the sum of the per-image losses
    ref = rand_image(34, h=48, w=40)
    term = DinoStyleGuidance(dino=dino, decode=dec, reference=ref, dino_size=32, posterior_scale=False)
    whole = float(term.loss(ctx, None))
    parts = sum(float(term.loss(ctx_for(x[i : i + 1], lambda v: 0.05 * v), None)) for i in range(3))
    assert whole == pytest.approx(parts, rel=1e-10)


def test_construction_errors(dino):
    dec = TinyDecoder()
    with pytest.raises(ValueError, match="decode"):
        DinoStructureGuidance(dino=dino, source=rand_image(0))
    with pytest.raises(ValueError, match="DINO model"):
        DinoStructureGuidance(decode=dec, source=rand_image(0))
    with pytest.raises(ValueError, match="source image"):
        DinoStructureGuidance(dino=dino, decode=dec)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        DinoStyleGuidance(dino=dino, decode=dec, reference=torch.rand(1, 32, 32, 3))
    wrong = DinoStructureGuidance(dino=dino, decode=lambda z: z, source=rand_image(0), dino_size=32)
    with pytest.raises(ValueError, match="decode must return"):
        wrong.loss(ctx_for(randn64(1, 4, 8, 8), lambda v: v), None)


def test_semantic_divergence_gate_and_previous_cls(dino):
    dec = TinyDecoder()
    src = rand_image(35)
    term = SemanticDivergenceGuidance(dino=dino, decode=dec, source=src, dino_size=32, posterior_scale=False)
    src_cls = dino_features(dino, src, 32).cls
    state: dict = {}
    x1 = randn64(1, 4, 8, 8, seed=36)
    c1 = dino_features(dino, dec(ctx_for(x1, lambda v: 0.05 * v).x0), 32).cls
    first = term.loss(ctx_for(x1, lambda v: 0.05 * v, state=state), None)
    assert float(first) == pytest.approx(100 * float(semantic_divergence_loss(c1, src_cls)), rel=1e-10)
    x2 = randn64(1, 4, 8, 8, seed=37)
    c2 = dino_features(dino, dec(ctx_for(x2, lambda v: 0.05 * v).x0), 32).cls
    second = term.loss(ctx_for(x2, lambda v: 0.05 * v, state=state), None)
    assert float(second) == pytest.approx(100 * float(semantic_divergence_loss(c2, c1)), rel=1e-10)
    # below the gate (DiffuseIT's diff_iter noise level) it is off
    low = term.loss(ctx_for(x2, lambda v: 0.05 * v, sigma=3.0, sigma_next=2.5, state=state), None)
    assert float(low) == 0.0


# -- with the tiny UNet and the sampler -----------------------------------------------------------------------


def grid(steps=10):
    return ddim_sigmas(sd_sigma_table(), steps)


def structure_value(dino, dec, x0, src):
    feats = dino_features(dino, dec(x0), 32, None).keys
    return float(
        1000 * self_similarity_loss(feats, dino_features(dino, src, 32, None).keys)
        + 200 * key_contrastive_loss(feats, dino_features(dino, src, 32, None).keys)
    )


def test_guided_step_lowers_the_structure_loss(den, dino):
    dec = TinyDecoder()
    src_latent = tiny_latent(40)
    src = dec(src_latent).clamp(0, 1)
    x, g = noised_start(src_latent, grid(), strength=0.5, seed=1)
    cond = tiny_cond(1)
    out = {}

    def run(weight):
        term = DinoStructureGuidance(weight=weight, dino=dino, decode=dec, source=src, dino_size=32, dino_max_size=None)
        guided_ddim_sample(
            den,
            x,
            g[:2],
            source_cond=cond,
            edit_cond=cond,
            guidance=[term],
            callback=lambda i, n, xx, x0: out.__setitem__(weight, x0),
            settings=SamplerSettings(cfg=1.0, step_mode="raw"),
        )
        return structure_value(dino, dec, out[weight], src)

    # small steps (the tiny random models' scale has nothing to do with SD's): monotone decrease
    values = [run(w) for w in (0.0, 0.001, 0.01)]
    assert values[0] > values[1] > values[2]


def test_style_guidance_pulls_the_cls_toward_the_reference(den, dino):
    dec = TinyDecoder()
    src_latent = tiny_latent(41)
    ref = rand_image(42, h=48, w=48)
    ref_cls = dino_features(dino, ref, 32).cls
    x, g = noised_start(src_latent, grid(), strength=0.8, seed=2)
    cond = tiny_cond(2)

    def cls_dist(weight):
        term = DinoStyleGuidance(weight=weight, dino=dino, decode=dec, reference=ref, lambda_pixel=0.0, dino_size=32)
        res = guided_ddim_sample(
            den,
            x,
            g,
            source_cond=cond,
            edit_cond=cond,
            guidance=[term],
            settings=SamplerSettings(cfg=1.0, step_mode="raw"),
        )
        return float((dino_features(dino, dec(res.latent), 32).cls - ref_cls).pow(2).mean())

    # the tiny random models need larger weights than SD (their [CLS] barely depends on the image)
    d0, d1, d2 = cls_dist(0.0), cls_dist(10.0), cls_dist(100.0)
    assert d0 > d1 > d2 and d2 < 0.3 * d0


def test_reference_branch_is_skipped_without_captures(den, dino):
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner, self.sigma_table, self.prediction_type = inner, inner.sigma_table, inner.prediction_type

        def layers(self):
            return self.inner.layers()

        def autograd_session(self):
            return self.inner.autograd_session()

        def predict(self, x, sigma, conds, capture=None):
            calls.append(len(conds))
            return self.inner.predict(x, sigma, conds, capture)

    dec = TinyDecoder()
    term = RangeGuidance(decode=dec)
    cond, src = tiny_cond(3), tiny_cond(4)
    res = guided_ddim_sample(
        Counting(den),
        tiny_latent(43),
        grid(3),
        source_cond=src,
        edit_cond=cond,
        guidance=[term],
        settings=SamplerSettings(cfg=2.0),
    )
    assert res.reference is None
    # per step: one guided forward (edit only) + one CFG forward (negative, edit); no reference forwards
    assert calls == [1, 2] * 3


def test_resampling_once_equals_no_resampling(den, dino):
    dec = TinyDecoder()
    term = DinoStructureGuidance(dino=dino, decode=dec, source=rand_image(44), dino_size=32)
    cond = tiny_cond(5)
    x, g = noised_start(tiny_latent(45), grid(), strength=0.3, seed=3)
    kw = dict(source_cond=cond, edit_cond=cond, guidance=[term])
    plain = guided_ddim_sample(den, x, g, **kw, settings=SamplerSettings(cfg=1.0, seed=7))
    once = guided_ddim_sample(den, x, g, **kw, settings=SamplerSettings(cfg=1.0, seed=7, resample=1))
    assert torch.equal(plain.latent, once.latent)
    three = guided_ddim_sample(den, x, g, **kw, settings=SamplerSettings(cfg=1.0, seed=7, resample=3))
    assert len(three.losses) == len(plain.losses) + 2
    assert not torch.allclose(three.latent, plain.latent)
    with pytest.raises(ValueError, match="resample"):
        guided_ddim_sample(den, x, g, **kw, settings=SamplerSettings(cfg=1.0, seed=7, resample=0))


def test_zero_weights_reproduce_unguided_sampling(den, dino):
    dec = TinyDecoder()
    terms = diffuseit_guidance(dino, dec, rand_image(46), reference=rand_image(47), weight=0.0, dino_size=32)
    cond = tiny_cond(6)
    x, g = noised_start(tiny_latent(48), grid(), strength=0.3, seed=4)
    a = guided_ddim_sample(
        den, x, g, source_cond=cond, edit_cond=cond, guidance=terms, settings=SamplerSettings(cfg=1.0)
    )
    b = guided_ddim_sample(den, x, g, source_cond=cond, edit_cond=cond, settings=SamplerSettings(cfg=1.0))
    assert torch.equal(a.latent, b.latent) and a.losses == []


def test_posterior_step_scale_is_the_vp_beta():
    s, sn = torch.tensor(6.2, dtype=D64), torch.tensor(5.6, dtype=D64)
    beta = 1 - alpha_bar_from_sigma(s) / alpha_bar_from_sigma(sn)
    assert posterior_step_scale(s, sn) == pytest.approx(float(beta), rel=1e-12)
    assert posterior_step_scale(1.0, 0.0) == pytest.approx(0.5)


def test_diffuseit_sample_runs_end_to_end(den, dino):
    dec = TinyDecoder()
    src_latent = tiny_latent(50)
    terms = diffuseit_guidance(dino, dec, dec(src_latent), reference=rand_image(51), dino_size=32)
    res = diffuseit_sample(
        den,
        src_latent,
        grid(8),
        cond=tiny_cond(7),
        negative_cond=tiny_cond(8),
        guidance=terms,
        strength=0.5,
        settings=SamplerSettings(cfg=3.0, resample=2, seed=1),
    )
    assert res.latent.shape == src_latent.shape and torch.isfinite(res.latent).all()
    assert res.skipped == [] and len(res.losses) == 4 + 1
    assert set(res.losses[0]) == {
        "DinoStructureGuidance",
        "DinoStyleGuidance",
        "SemanticDivergenceGuidance",
        "RangeGuidance",
    }


def test_autograd_session_wraps_decoder_and_dino(dino):
    import contextlib

    log = []

    @contextlib.contextmanager
    def session():
        log.append("enter")
        yield
        log.append("exit")

    dec = TinyDecoder()
    x = randn64(1, 4, 8, 8, seed=52)
    plain = DinoStructureGuidance(dino=dino, decode=dec, source=rand_image(53), dino_size=32)
    hooked = DinoStructureGuidance(dino=dino, decode=dec, source=rand_image(53), dino_size=32, autograd_session=session)
    a = plain.loss(ctx_for(x, lambda v: 0.05 * v), None)
    b = hooked.loss(ctx_for(x, lambda v: 0.05 * v), None)
    assert float(a) == float(b)
    # source features (once), decode, DINO forward
    assert log == ["enter", "exit"] * 3
    hooked.loss(ctx_for(x, lambda v: 0.05 * v), None)
    assert log == ["enter", "exit"] * 5  # the source's features are cached on the term


def test_both_branches_and_a_separate_negative(den, dino):
    """branches="both" guides the negative-conditioned half too: the first guided evaluation logs, per term,
    the weighted mean of the term on the two halves' predictions (recomputed here from the denoiser), and
    the result differs from "edit" by a measured amount (0.14 of how far guidance itself moves it)."""
    dec = TinyDecoder()
    src_latent = tiny_latent(54)
    terms = diffuseit_guidance(dino, dec, dec(src_latent), dino_size=32)
    x, g = noised_start(src_latent, grid(6), strength=0.5, seed=6)
    neg, edit = tiny_cond(11), tiny_cond(10)
    kw = dict(source_cond=tiny_cond(9), edit_cond=edit, negative_cond=neg)
    res = guided_ddim_sample(
        den, x, g, guidance=terms, **kw, settings=SamplerSettings(cfg=2.0, resample=2, branches="both", step_mode="raw")
    )
    assert torch.isfinite(res.latent).all() and res.reference is None and res.skipped == []
    eps_neg, eps_edit = (p.eps for p in den.predict(x, g[0], [neg, edit]))
    for term in terms:
        halves = []
        for eps in (eps_neg, eps_edit):
            ctx = StepContext(0, len(g) - 1, g[0], x, eps, Prediction(eps, {}, {}), None, torch.Generator(), g[1])
            halves.append(float(term.loss(ctx, None)))
        want = term.weight * (halves[0] + halves[1]) / 2
        assert res.losses[0][type(term).__name__] == pytest.approx(want, rel=1e-9)
    edit_only = guided_ddim_sample(
        den, x, g, guidance=terms, **kw, settings=SamplerSettings(cfg=2.0, resample=2, branches="edit", step_mode="raw")
    )
    unguided = guided_ddim_sample(den, x, g, **kw, settings=SamplerSettings(cfg=2.0, resample=2))
    moved = float((edit_only.latent - unguided.latent).norm())
    assert float((res.latent - edit_only.latent).norm()) > 0.05 * moved > 0  # measured 0.14
