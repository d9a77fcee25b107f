"""DiffuseIT port: losses against independent float64 formulas, gradients, guidance terms and sampler support.

Models are tiny and random: a DINO-layout ViT (``tiny_vision.tiny_dino``, patch 8, 32 wide), a fixed random
conv + upsampling "decoder" (latent (B, 4, h, w) -> image (B, 3, 4h, 4w)) and the tiny diffusers UNet
(``tiny.tiny_denoiser``). DINO runs at small sizes (``dino_size`` 16-32 px) except where 785 tokens matter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zerocon_core.denoiser import Prediction
from zerocon_core.diffuseit import (
    DinoStructureGuidance,
    DinoStyleGuidance,
    RangeGuidance,
    SemanticDivergenceGuidance,
    cls_loss,
    diffuseit_guidance,
    diffuseit_sample,
    key_contrastive_loss,
    pixel_mse_loss,
    posterior_step_scale,
    range_loss,
    self_similarity_loss,
    semantic_divergence_loss,
)
from zerocon_core.diffuseit_start import DIFFUSEIT_START_SIGMA, noised_start, renoise, start_index
from zerocon_core.dino import dino_features
from zerocon_core.guidance import StepContext
from zerocon_core.sampler import SamplerSettings, guided_ddim_sample
from zerocon_core.schedule import alpha_bar_from_sigma, ddim_sigmas, sd_sigma_table

from .tiny import single_thread, tiny_cond, tiny_denoiser, tiny_latent
from .tiny_vision import tiny_dino

D64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


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


@pytest.fixture(scope="module")
def den():
    return tiny_denoiser("epsilon", seed=0)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def image(seed, b=1, h=32, w=32):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=D64)


# -- independent float64 reference formulas (loops, no code under test) ---------------------------------------


def ref_cos(u, v):
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def ref_ssim(keys, src):
    total = 0.0
    for k, s in zip(keys, src):
        t = k.shape[0]
        acc = 0.0
        for a in range(t):
            for b in range(t):
                acc += (ref_cos(k[a], k[b]) - ref_cos(s[a], s[b])) ** 2
        total += acc / (t * t)
    return total


def ref_contrastive(keys, src, tau):
    total = 0.0
    for q, k in zip(keys, src):
        t = q.shape[0]
        acc = 0.0
        for a in range(t):
            pos = ref_cos(q[a], k[a]) / tau
            logits = [pos] + [(-10.0 if b == a else ref_cos(q[a], k[b])) / tau for b in range(t)]
            m = max(logits)
            acc += -(pos - (m + math.log(sum(math.exp(v - m) for v in logits))))
        total += acc / t
    return total


# -- losses ----------------------------------------------------------------------------------------------------


def test_self_similarity_loss_matches_formula_and_identity():
    keys, src = rand(2, 6, 5, seed=1), rand(2, 6, 5, seed=2)
    assert float(self_similarity_loss(keys, src)) == pytest.approx(ref_ssim(keys, src), rel=1e-12)
    assert float(self_similarity_loss(src, src)) == pytest.approx(0.0, abs=1e-15)
    # a batch-1 source broadcasts: the same as repeating it
    one = src[:1]
    assert float(self_similarity_loss(keys, one)) == pytest.approx(ref_ssim(keys, one.expand(2, 6, 5)), rel=1e-12)
    assert self_similarity_loss(keys.float(), src.float()).dtype == torch.float32


def test_key_contrastive_loss_matches_formula_chance_and_identity():
    keys, src = rand(2, 7, 4, seed=3), rand(2, 7, 4, seed=4)
    for tau in (0.07, 0.5):
        assert float(key_contrastive_loss(keys, src, tau)) == pytest.approx(ref_contrastive(keys, src, tau), rel=1e-10)
    # chance level ln(T) for near-orthogonal random keys; well below it on identical keys
    wide_q, wide_k = rand(1, 20, 4096, seed=5), rand(1, 20, 4096, seed=6)
    assert float(key_contrastive_loss(wide_q, wide_k)) == pytest.approx(math.log(20), abs=0.15)
    assert float(key_contrastive_loss(wide_k, wide_k)) < 0.1


def test_cls_semantic_range_pixel_losses_match_formulas():
    cls, ref = rand(3, 8, seed=7), rand(1, 8, seed=8)
    expect = sum(float(((cls[i] - ref[0]) ** 2).mean()) for i in range(3))
    assert float(cls_loss(cls, ref)) == pytest.approx(expect, rel=1e-12)
    assert float(semantic_divergence_loss(cls, ref)) == pytest.approx(-expect, rel=1e-12)

    img = 0.5 + 0.8 * rand(2, 3, 5, 5, seed=9)  # partly outside [0, 1]
    expect = 0.0
    for i in range(2):
        x = (2 * img[i] - 1).flatten().tolist()
        expect += sum((v - min(1.0, max(-1.0, v))) ** 2 for v in x) / len(x)
    assert float(range_loss(img)) == pytest.approx(expect, rel=1e-12)
    assert float(range_loss(img.clamp(0, 1))) == 0.0

    tgt = image(10, b=1, h=5, w=5)
    expect = sum(float(((2 * img[i] - 1) - (2 * tgt[0] - 1)).pow(2).mean()) for i in range(2))
    assert float(pixel_mse_loss(img, tgt)) == pytest.approx(expect, rel=1e-12)


def test_pixel_mse_resizes_a_reference_of_another_size():
    img, tgt = image(11, h=8, w=12), image(12, h=20, w=30)
    resized = F.interpolate(tgt, size=(8, 12), mode="bilinear", align_corners=False, antialias=True)
    assert float(pixel_mse_loss(img, tgt)) == pytest.approx(float(4 * (img - resized).pow(2).mean()), rel=1e-12)


def test_batch_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="batch mismatch.*reference has batch 2"):
        cls_loss(rand(3, 8), rand(2, 8))
    with pytest.raises(ValueError, match="batch mismatch.*source has batch 2"):
        self_similarity_loss(rand(3, 5, 4), rand(2, 5, 4))
    with pytest.raises(ValueError, match="patch grids"):
        key_contrastive_loss(rand(1, 5, 4), rand(1, 6, 4))


def test_posterior_step_scale_is_the_vp_beta():
    s, sn = torch.tensor(6.2, dtype=D64), torch.tensor(5.6, dtype=D64)
    beta = 1 - alpha_bar_from_sigma(s) / alpha_bar_from_sigma(sn)
    assert posterior_step_scale(s, sn) == pytest.approx(float(beta), rel=1e-12)
    assert posterior_step_scale(1.0, 0.0) == pytest.approx(0.5)


def test_gradcheck_losses():
    keys = rand(2, 5, 3, seed=13).requires_grad_(True)
    src = rand(2, 5, 3, seed=14)
    cls = rand(2, 4, seed=15).requires_grad_(True)
    ref = rand(1, 4, seed=16)
    img = (0.5 + 0.7 * rand(1, 3, 4, 4, seed=17)).requires_grad_(True)
    tgt = image(18, h=6, w=6)
    assert torch.autograd.gradcheck(lambda k: self_similarity_loss(k, src), (keys,))
    assert torch.autograd.gradcheck(lambda k: key_contrastive_loss(k, src, 0.3), (keys,))
    assert torch.autograd.gradcheck(lambda c: cls_loss(c, ref), (cls,))
    assert torch.autograd.gradcheck(lambda c: semantic_divergence_loss(c, ref), (cls,))
    assert torch.autograd.gradcheck(lambda i: pixel_mse_loss(i, tgt), (img,))
    assert torch.autograd.gradcheck(range_loss, (img,))


# -- DINO --------------------------------------------------------------------------------------------------------


def test_dino_keys_are_differentiable_wrt_the_image(dino):
    img = image(19, h=16, w=16).requires_grad_(True)
    feats = dino_features(dino, img, size=16)
    assert feats.keys.shape == (1, 5, 32) and feats.cls.shape == (1, 32)
    src = dino_features(dino, image(20, h=16, w=16), size=16).keys.detach()
    assert torch.autograd.gradcheck(lambda i: self_similarity_loss(dino_features(dino, i, size=16).keys, src), (img,))


def test_785_tokens_at_224(dino):
    feats = dino_features(dino, image(21, h=256, w=256))
    assert feats.keys.shape[1] == 785


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
    src = image(22, h=16, w=16)
    term = DinoStructureGuidance(dino=dino, decode=dec, source=src, dino_size=16, dino_max_size=None)
    style = DinoStyleGuidance(dino=dino, decode=dec, reference=image(23, h=24, w=24), dino_size=16, dino_max_size=None)
    x = rand(1, 4, 4, 4, seed=24).requires_grad_(True)

    def f(t):
        ctx = ctx_for(t, lambda v: 0.1 * torch.tanh(v))
        return term.loss(ctx, None) + style.loss(ctx, None)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_term_losses_equal_the_pure_losses(dino):
    dec = TinyDecoder()
    src, ref = image(25, h=32, w=32), image(26, h=40, w=24)
    x = rand(2, 4, 8, 8, seed=27)
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
    src = image(28)
    terms = diffuseit_guidance(dino, dec, src, reference=image(29), dino_size=32, dino_max_size=None)
    assert [type(t).__name__ for t in terms] == [
        "DinoStructureGuidance",
        "DinoStyleGuidance",
        "SemanticDivergenceGuidance",
        "RangeGuidance",
    ]
    state: dict = {}
    x = rand(1, 4, 8, 8, seed=30).requires_grad_(True)
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
    x = rand(3, 4, 8, 8, seed=31)
    ctx = ctx_for(x, lambda v: 0.05 * v)
    bad = DinoStyleGuidance(dino=dino, decode=dec, reference=image(32, b=2), dino_size=32)
    with pytest.raises(ValueError, match="3 image.*reference image has batch 2"):
        bad.loss(ctx, None)
    bad_src = DinoStructureGuidance(dino=dino, decode=dec, source=image(33, b=2), dino_size=32)
    with pytest.raises(ValueError, match="3 image.*source image has batch 2"):
        bad_src.loss(ctx, None)
    # a batch-1 reference is shared: the loss is the sum of the per-image losses
    ref = image(34, h=48, w=40)
    term = DinoStyleGuidance(dino=dino, decode=dec, reference=ref, dino_size=32, posterior_scale=False)
    whole = float(term.loss(ctx, None))
    parts = sum(float(term.loss(ctx_for(x[i : i + 1], lambda v: 0.05 * v), None)) for i in range(3))
    assert whole == pytest.approx(parts, rel=1e-10)


def test_construction_errors(dino):
    dec = TinyDecoder()
    with pytest.raises(ValueError, match="decode"):
        DinoStructureGuidance(dino=dino, source=image(0))
    with pytest.raises(ValueError, match="DINO model"):
        DinoStructureGuidance(decode=dec, source=image(0))
    with pytest.raises(ValueError, match="source image"):
        DinoStructureGuidance(dino=dino, decode=dec)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        DinoStyleGuidance(dino=dino, decode=dec, reference=torch.rand(1, 32, 32, 3))
    wrong = DinoStructureGuidance(dino=dino, decode=lambda z: z, source=image(0), dino_size=32)
    with pytest.raises(ValueError, match="decode must return"):
        wrong.loss(ctx_for(rand(1, 4, 8, 8), lambda v: v), None)


def test_semantic_divergence_gate_and_previous_cls(dino):
    dec = TinyDecoder()
    src = image(35)
    term = SemanticDivergenceGuidance(dino=dino, decode=dec, source=src, dino_size=32, posterior_scale=False)
    src_cls = dino_features(dino, src, 32).cls
    state: dict = {}
    x1 = rand(1, 4, 8, 8, seed=36)
    c1 = dino_features(dino, dec(ctx_for(x1, lambda v: 0.05 * v).x0), 32).cls
    first = term.loss(ctx_for(x1, lambda v: 0.05 * v, state=state), None)
    assert float(first) == pytest.approx(100 * float(semantic_divergence_loss(c1, src_cls)), rel=1e-10)
    x2 = rand(1, 4, 8, 8, seed=37)
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
            settings=SamplerSettings(cfg=1.0),
            guidance=[term],
            callback=lambda i, n, xx, x0: out.__setitem__(weight, x0),
        )
        return structure_value(dino, dec, out[weight], src)

    # small steps (the tiny random models' scale has nothing to do with SD's): monotone decrease
    values = [run(w) for w in (0.0, 0.001, 0.01)]
    assert values[0] > values[1] > values[2]


def test_style_guidance_pulls_the_cls_toward_the_reference(den, dino):
    dec = TinyDecoder()
    src_latent = tiny_latent(41)
    ref = image(42, h=48, w=48)
    ref_cls = dino_features(dino, ref, 32).cls
    x, g = noised_start(src_latent, grid(), strength=0.8, seed=2)
    cond = tiny_cond(2)

    def cls_dist(weight):
        term = DinoStyleGuidance(weight=weight, dino=dino, decode=dec, reference=ref, lambda_pixel=0.0, dino_size=32)
        res = guided_ddim_sample(
            den, x, g, source_cond=cond, edit_cond=cond, settings=SamplerSettings(cfg=1.0), guidance=[term]
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
        settings=SamplerSettings(cfg=2.0),
        guidance=[term],
    )
    assert res.reference is None
    # per step: one guided forward (edit only) + one CFG forward (negative, edit); no reference forwards
    assert calls == [1, 2] * 3


def test_resampling_once_equals_no_resampling(den, dino):
    dec = TinyDecoder()
    term = DinoStructureGuidance(dino=dino, decode=dec, source=image(44), dino_size=32)
    cond = tiny_cond(5)
    x, g = noised_start(tiny_latent(45), grid(), strength=0.3, seed=3)
    kw = dict(source_cond=cond, edit_cond=cond, guidance=[term])
    plain = guided_ddim_sample(den, x, g, settings=SamplerSettings(cfg=1.0, seed=7), **kw)
    once = guided_ddim_sample(den, x, g, settings=SamplerSettings(cfg=1.0, seed=7, resample=1), **kw)
    assert torch.equal(plain.latent, once.latent)
    three = guided_ddim_sample(den, x, g, settings=SamplerSettings(cfg=1.0, seed=7, resample=3), **kw)
    assert len(three.losses) == len(plain.losses) + 2
    assert not torch.allclose(three.latent, plain.latent)
    with pytest.raises(ValueError, match="resample"):
        SamplerSettings(cfg=1.0, seed=7, resample=0)


def test_zero_weights_reproduce_unguided_sampling(den, dino):
    dec = TinyDecoder()
    terms = diffuseit_guidance(dino, dec, image(46), reference=image(47), weight=0.0, dino_size=32)
    cond = tiny_cond(6)
    x, g = noised_start(tiny_latent(48), grid(), strength=0.3, seed=4)
    one = SamplerSettings(cfg=1.0)
    a = guided_ddim_sample(den, x, g, source_cond=cond, edit_cond=cond, settings=one, guidance=terms)
    b = guided_ddim_sample(den, x, g, source_cond=cond, edit_cond=cond, settings=one)
    assert torch.equal(a.latent, b.latent) and a.losses == []


def test_renoise_is_the_exact_forward_transition():
    x = torch.zeros(20000, dtype=D64)
    out = renoise(x, 1.0, 2.0, torch.Generator().manual_seed(0))
    assert float(out.std()) == pytest.approx(math.sqrt(3.0), rel=0.02)
    with pytest.raises(ValueError):
        renoise(x, 2.0, 1.0, torch.Generator())


def test_noised_start_at_strength():
    sig = grid(50)
    x0 = tiny_latent(49)
    for strength, k in ((1.0, 0), (0.5, 25), (0.3, 35), (0.01, 49)):
        x, g = noised_start(x0, sig, strength, seed=5)
        assert start_index(sig, strength) == k
        assert torch.equal(g, sig[k:]) and len(g) - 1 == 50 - k
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32).to(D64)
        torch.testing.assert_close(x, x0 + sig[k] * noise, rtol=0, atol=1e-12)
    # default: DiffuseIT's noise level (sigma 5.98), the nearest level in log-sigma
    _, g = noised_start(x0, sig, None, seed=5)
    assert float(g[0]) == pytest.approx(6.197, abs=1e-3)
    assert abs(math.log(float(g[0]) / DIFFUSEIT_START_SIGMA)) < 0.05
    with pytest.raises(ValueError, match="strength"):
        noised_start(x0, sig, 0.0)


def test_diffuseit_sample_runs_end_to_end(den, dino):
    dec = TinyDecoder()
    src_latent = tiny_latent(50)
    terms = diffuseit_guidance(dino, dec, dec(src_latent), reference=image(51), dino_size=32)
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
    x = rand(1, 4, 8, 8, seed=52)
    plain = DinoStructureGuidance(dino=dino, decode=dec, source=image(53), dino_size=32)
    hooked = DinoStructureGuidance(dino=dino, decode=dec, source=image(53), dino_size=32, autograd_session=session)
    a = plain.loss(ctx_for(x, lambda v: 0.05 * v), None)
    b = hooked.loss(ctx_for(x, lambda v: 0.05 * v), None)
    assert float(a) == float(b)
    # source features (once), decode, DINO forward
    assert log == ["enter", "exit"] * 3
    hooked.loss(ctx_for(x, lambda v: 0.05 * v), None)
    assert log == ["enter", "exit"] * 5  # the source's features are cached on the term


def test_both_branches_and_a_separate_negative(den, dino):
    dec = TinyDecoder()
    src_latent = tiny_latent(54)
    terms = diffuseit_guidance(dino, dec, dec(src_latent), dino_size=32)
    x, g = noised_start(src_latent, grid(6), strength=0.5, seed=6)
    res = guided_ddim_sample(
        den,
        x,
        g,
        source_cond=tiny_cond(9),
        edit_cond=tiny_cond(10),
        negative_cond=tiny_cond(11),
        guidance=terms,
        settings=SamplerSettings(cfg=2.0, branches="both", resample=2),
    )
    assert torch.isfinite(res.latent).all() and res.reference is None and res.skipped == []
