"""The 2026 Flux-derived families on tiny models built from ComfyUI's own classes (tiny_families.py).

Flux.1 Kontext (``model_base.Flux`` with ComfyUI's ``reference_latents`` in the conditioning, as ReferenceLatent
sets them): guidance off, our inversion and Guided Sampler equal ComfyUI's stock sampler on the model's own sigmas
(1e-5) with the reference in the conditioning (and the reference does reach the network); the captured
text-to-image probabilities have the image tokens' rows only (not the reference tokens'), with the softmax over
every key (text, image and reference), equal to a float64 recomputation from the block's q and k with Flux's RoPE
on Kontext's positions; one guided step lowers each loss; guided, interrupted and failed runs leave the MODEL
exactly as it was; DiffuseIT runs. Kontext needs a ComfyUI whose Flux takes ``ref_latents`` (feature detection).

Chroma (``supported_models.Chroma`` / ``model_base.Chroma``, T5 only, real CFG), with and without an attention mask
in the conditioning: the same checks, the maps against a float64 recomputation with RoPE and the mask (padded text
columns get 0), and ``dit_capture.kernel_mask`` against ComfyUI's mask broadcasting. Skipped where ComfyUI has no
Chroma.

Two flow behaviours: DiffuseIT's noise blend on a flow model mixes at level ``t``; branches "pix2pix-zero" at cfg 1
take the edit's noise from the edit copy.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import comfy.model_management
import dit_helpers as dh
import pytest
import sampling_helpers as h
import tiny_families as tf
import tiny_models as tm
import torch
from conftest import pack_module
from test_diffuseit_nodes import dino, dino_nodes, image, structure, style  # noqa: F401  (fixtures)
from test_dit_capture import (
    _first_blocks_probabilities,
    _heads,
    _lin,
    _ln,
    _rms,
    _rope_angles,
    _sharp,
    flux_dev_two_singles,
)
from test_flow_diffuseit import encode
from test_flow_families import _assert_untouched as _assert_flow_untouched
from test_sampling_cleanup import _snapshot

guidance = pack_module("zerocon_core.method.guidance")

STEPS = 4


def _has_kontext() -> bool:
    from comfy.ldm.flux.model import Flux

    return "ref_latents" in inspect.signature(Flux.forward).parameters


kontext = pytest.mark.skipif(
    not _has_kontext(), reason="this ComfyUI's Flux takes no reference latents (Flux.1 Kontext)"
)


def _kontext_conds():
    return tf.kontext_conditioning(1), tf.kontext_conditioning(2)


# -- Flux.1 Kontext ---------------------------------------------------------------------------------------------


@kontext
def test_kontext_is_recognised_as_flux_dev(zc):
    fam = zc.families.detect_family(tm.flux_dev())
    assert (fam.name, fam.variant, fam.cfg_style, fam.latent_channels) == ("Flux", "dev", "distilled", 16)


@kontext
def test_kontext_inversion_equals_stock_euler_and_reads_the_reference(zc, run):
    model = tm.flux_dev()
    source, _ = _kontext_conds()
    lat = tm.flow_latent(3, size=8)
    x_t, _, sigmas = h.invert(zc, run, model, lat, source, steps=STEPS)
    h.assert_inversion_equals_stock_euler_short_of_1(zc, model, source, lat, h.flip(sigmas))
    # the reference reaches the network: another reference, another x_T
    other = tf.kontext_conditioning(1, reference=tf.reference_latent(41))
    x_t2, _, _ = h.invert(zc, run, model, lat, other, steps=STEPS)
    assert float((x_t["samples"] - x_t2["samples"]).abs().max()) > 1e-4


@kontext
def test_kontext_guided_sampler_without_guidance_equals_stock_euler(zc, run):
    model = tm.flux_dev()
    source, edit = _kontext_conds()
    _, inversion, sigmas = h.invert(zc, run, model, tm.flow_latent(4, size=8), source, steps=STEPS)
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=1.0)
    stock = h.stock_euler_from_inversion(model, edit, source, 1.0, inversion, sigmas)
    torch.testing.assert_close(out["samples"], stock, rtol=0, atol=1e-5)
    plain, _ = h.guided(zc, run, model, inversion, tm.flow_conditioning(2, guidance=3.5), cfg=1.0)
    assert float((out["samples"] - plain["samples"]).abs().max()) > 1e-4  # the edit's reference was used


@kontext
def test_kontext_probabilities_have_the_image_rows_only(zc):
    """Double and single blocks: (B, H, image tokens, text tokens), the softmax over text + image + reference keys,
    equal to a float64 recomputation with RoPE on Kontext's positions (reference tokens at index 1); the features
    are the image tokens' outputs, not the reference's."""
    model = flux_dev_two_singles()
    dm = model.model.diffusion_model
    tokens, ref = 12, tf.reference_latent(42, 12, 16)  # image: 16 x 16 latent (8 x 8 tokens); reference 6 x 8
    cond = tf.kontext_conditioning(2, reference=ref, tokens=tokens)
    pred, seen = dh.first_blocks_captured(zc, model, cond)
    grid, n = 8, 64

    def positions(index, rows, cols):
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        return torch.stack((torch.full((rows * cols,), float(index)), r.flatten(), c.flatten()), -1)

    ids = torch.cat((torch.zeros(tokens, 3), positions(0, grid, grid), positions(1, 6, 8)))
    assert seen["double"]["img"].shape[1] == n + 48  # the reference tokens follow the image's
    angles = _rope_angles(ids, dm.params.axes_dim, dm.params.theta)
    for name, single, p in _first_blocks_probabilities(dm, seen, angles):
        got = pred.probs[f"{name}.0.img2txt"]
        assert got.shape == (1, dm.num_heads, n, tokens)
        torch.testing.assert_close(got.double(), p[:, :, tokens : tokens + n, :tokens], rtol=1e-4, atol=1e-6)
        img = seen[name]["out"][:, tokens : tokens + n] if single else seen[name]["out"][:, :n]
        assert torch.equal(pred.features[f"{name}.0.img"], img.transpose(1, 2).reshape(1, -1, grid, grid))


@kontext
@dh.each_term(16)
def test_kontext_one_guided_step_lowers_each_loss(zc, term):
    conds = {"positive": tf.kontext_conditioning(7), "negative": tf.kontext_conditioning(8)}
    dh.assert_one_step_lowers_the_loss(zc, _sharp(tm.flux_dev()), term, conds)


@dataclasses.dataclass(frozen=True)
class _Stopping(guidance.CrossAttentionGuidance):
    """Cross-attention guidance that raises ``error`` at step ``stop_at``."""

    stop_at: int = -1
    error: type = comfy.model_management.InterruptProcessingException

    def loss(self, ctx, request):
        if ctx.step == self.stop_at:
            raise self.error("stop")
        return super().loss(ctx, request)


def _assert_untouched(model, before, reference, pos, neg, lat, cfg=1.0):
    after = _snapshot(model)
    assert after["wrappers"] == before["wrappers"] and after["callbacks"] == before["callbacks"]
    _assert_flow_untouched(model, before, reference, pos, neg, lat, cfg=cfg)


def _assert_guided_runs_leave_the_model_as_it_was(zc, run, model, source, edit, lat, cfg):
    """A guided run (it moves the latent), an interrupted one and a failing one leave the MODEL untouched."""
    _, inversion, _ = h.invert(zc, run, model, lat, source, steps=3)
    reference = h.ksampler(model, edit, source, lat, cfg=cfg)
    before = _snapshot(model)
    terms = (_Stopping(weight=1.0), guidance.PatchNCEGuidance(weight=1.0, num_patches=8))
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=cfg, guidance=terms)
    plain, _ = h.guided(zc, run, model, inversion, edit, cfg=cfg)
    assert torch.isfinite(out["samples"]).all()
    assert float((out["samples"] - plain["samples"]).abs().max()) > 1e-4
    _assert_untouched(model, before, reference, edit, source, lat, cfg=cfg)
    for error in (comfy.model_management.InterruptProcessingException, RuntimeError):
        with pytest.raises(error, match="stop"):
            h.guided(
                zc, run, model, inversion, edit, cfg=cfg, guidance=(_Stopping(weight=1.0, stop_at=1, error=error),)
            )
        _assert_untouched(model, before, reference, edit, source, lat, cfg=cfg)


@kontext
def test_kontext_guided_interrupted_and_failed_runs_leave_the_model_as_it_was(zc, run):
    model = tm.flux_dev()
    source, edit = _kontext_conds()
    lat = tm.flow_latent(7, size=8)
    _assert_guided_runs_leave_the_model_as_it_was(zc, run, model, source, edit, lat, cfg=1.0)


def _assert_diffuseit_runs(run, dino, model, conds, cfg, repeat=False, vae=None, stock_latent=None):  # noqa: F811
    """DiffuseIT with structure + style terms (``vae``, default a tiny 16-channel one; 4 steps at ``cfg``): the DINO
    terms move the latent, a seeded run repeats (``repeat``), and a stock KSampler on the MODEL gives what it gave
    before (on ``stock_latent``, default a 16-channel 8 x 8 one)."""
    dn = pack_module("nodes.classes.diffuseit_nodes")
    vae = tm.flow_vae(0) if vae is None else vae
    src = image(4)
    lat = encode(vae, src)
    pos, neg = conds
    stock_latent = tm.flow_latent(0, size=8) if stock_latent is None else stock_latent
    reference = h.ksampler(model, pos, neg, stock_latent, cfg=cfg)
    kw = dict(
        model=model, positive=pos, negative=neg, latent=lat, steps=4, cfg=cfg, strength=0.5, resample=1, seed=3,
        step_mode="raw", step_size=0.02,
    )  # fmt: skip
    terms = style(dn, run, model, vae, dino, image(5), previous=structure(dn, run, model, vae, dino, src))
    out = run(dn.ZeroConDiffuseITSampler, guidance=terms, **kw)[0]
    again = run(dn.ZeroConDiffuseITSampler, guidance=terms, **kw)[0] if repeat else None
    plain = run(dn.ZeroConDiffuseITSampler, guidance=structure(dn, run, model, vae, dino, src, weight=0.0), **kw)[0]
    assert out["samples"].shape == lat["samples"].shape and torch.isfinite(out["samples"]).all()
    if repeat:
        assert torch.equal(out["samples"], again["samples"])
    assert float((out["samples"] - plain["samples"]).abs().max()) > 1e-4
    assert torch.equal(h.ksampler(model, pos, neg, stock_latent, cfg=cfg), reference)
    return lat


@kontext
def test_kontext_diffuseit_runs(run, dino):  # noqa: F811
    """DiffuseIT on a Kontext conditioning (a tiny 16-channel VAE): the DINO terms move the latent, seeded runs
    repeat, and the MODEL is left as it was."""
    _assert_diffuseit_runs(run, dino, tm.flux_dev(), _kontext_conds(), cfg=1.0, repeat=True)


# -- Chroma ---------------------------------------------------------------------------------------------------------

chroma = pytest.mark.skipif(not tf.has_chroma(), reason="this ComfyUI has no Chroma (supported_models.Chroma)")


def _chroma_conds(pad=0):
    return tf.t5_conditioning(1, pad=pad), tf.t5_conditioning(2, pad=pad)


@chroma
def test_chroma_is_recognised_by_its_config_class(zc):
    import comfy.model_base

    model = tf.chroma()
    assert type(model.model) is comfy.model_base.Chroma
    fam = zc.families.detect_family(model)
    assert (fam.name, fam.prediction_type, fam.latent_channels, fam.cfg_style, str(fam)) == (
        "Chroma",
        "flow",
        16,
        "cfg",
        "Chroma (flow matching)",
    )
    assert (fam.tiny_decoder, fam.latent_scale, fam.native_size) == ("taef1", 8, 1024)
    assert zc.families.detect_family(tm.flux()).name == "Flux"  # a Flux is still a Flux
    assert "SD3/SD3.5, Flux, Flux.2, Chroma, " in zc.families.SUPPORTED


@chroma
@pytest.mark.parametrize("pad", [0, 4], ids=["plain", "masked"])
def test_chroma_inversion_and_sampler_equal_stock_euler(zc, run, pad):
    model = tf.chroma()
    source, edit = _chroma_conds(pad)
    lat = tm.flow_latent(3, size=16)
    _, inversion, sigmas = h.invert(zc, run, model, lat, source, steps=STEPS)
    h.assert_inversion_equals_stock_euler_short_of_1(zc, model, source, lat, h.flip(sigmas))
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=2.0)
    stock = h.stock_euler_from_inversion(model, edit, source, 2.0, inversion, sigmas)
    torch.testing.assert_close(out["samples"], stock, rtol=0, atol=1e-5)
    assert float((out["samples"] - inversion.latent).abs().max()) > 0.1


def _chroma_qk(block, args, single: bool):
    """q, k (B, H, L, d) of a Chroma block in float64 from its weights and the approximator's modulations (``vec``:
    the single block's (shift, scale, gate); the double block's ((img 1, img 2), (txt 1, txt 2))), before RoPE."""

    def modulate(x, mod):
        return _ln(x.double()) * (1 + mod.scale.double()) + mod.shift.double()

    if single:
        qkv = _lin(modulate(args["img"], args["vec"]), block.linear1)[..., : 3 * block.hidden_size]
        q, k = _heads(qkv, block.num_heads)
        return _rms(q, block.norm.query_norm), _rms(k, block.norm.key_norm)
    (img_mod, _), (txt_mod, _) = args["vec"]
    out = []
    for x, mod, attn in ((args["txt"], txt_mod, block.txt_attn), (args["img"], img_mod, block.img_attn)):
        q, k = _heads(_lin(modulate(x, mod), attn.qkv), block.num_heads)
        out.append((_rms(q, attn.norm.query_norm), _rms(k, attn.norm.key_norm)))
    return torch.cat((out[0][0], out[1][0]), 2), torch.cat((out[0][1], out[1][1]), 2)


@chroma
@pytest.mark.parametrize("pad", [0, 5], ids=["plain", "masked"])
def test_chroma_probabilities_equal_a_float64_recomputation_with_rope_and_mask(zc, pad):
    """Double and single blocks: softmax over all keys of (RoPE q)(RoPE k)^T + the conditioning's key mask,
    recomputed in float64 from the blocks' weights and modulations; the padded text columns get exactly 0."""
    model = _sharp(tf.chroma()).clone()
    dm = model.model.diffusion_model
    tokens, grid, n = 12, 8, 64
    pred, seen = dh.first_blocks_captured(zc, model, tf.t5_conditioning(2, tokens=tokens, pad=pad))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ids = torch.cat((torch.zeros(tokens, 3), torch.stack((torch.zeros(n), rows.flatten(), cols.flatten()), -1)))
    angles = _rope_angles(ids, dm.params.axes_dim, dm.params.theta)
    mask = torch.zeros(tokens + n, dtype=torch.float64)
    mask[tokens - pad : tokens] = float("-inf") if pad else 0.0
    for name, single, p in _first_blocks_probabilities(dm, seen, angles, _chroma_qk, mask):
        got = pred.probs[f"{name}.0.img2txt"]
        assert got.shape == (1, dm.num_heads, n, tokens)
        torch.testing.assert_close(got.double(), p[:, :, tokens:, :tokens], rtol=1e-4, atol=1e-6)
        if pad:
            assert torch.all(got[..., tokens - pad :] == 0) and torch.all(got[..., : tokens - pad] > 0)
        img = seen[name]["out"][:, tokens:] if single else seen[name]["out"]
        assert torch.equal(pred.features[f"{name}.0.img"], img.transpose(1, 2).reshape(1, -1, grid, grid))


@chroma
@dh.each_term(16)
def test_chroma_one_guided_step_lowers_each_loss(zc, term):
    conds = {"positive": tf.t5_conditioning(7, pad=3), "negative": tf.t5_conditioning(8, pad=3)}
    dh.assert_one_step_lowers_the_loss(zc, _sharp(tf.chroma()), term, conds)


@chroma
def test_chroma_guided_interrupted_and_failed_runs_leave_the_model_as_it_was(zc, run):
    model = tf.chroma()
    source, edit = _chroma_conds(pad=3)
    lat = tm.flow_latent(7, size=16)
    _assert_guided_runs_leave_the_model_as_it_was(zc, run, model, source, edit, lat, cfg=2.0)


@chroma
def test_chroma_diffuseit_runs(run, dino):  # noqa: F811
    _assert_diffuseit_runs(run, dino, tf.chroma(), (tf.t5_conditioning(1), tf.t5_conditioning(2)), cfg=2.0)


# -- the mask as ComfyUI's kernels read it ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["key", "per-row", "shared"])
def test_text_probabilities_read_masks_as_the_kernels_do(shape):
    """(B, 1, L) key masks, (B, L, L) per-batch-row masks and (L, L) shared ones, B = 2 and 2 heads: the
    probabilities equal a dense softmax under the mask as ComfyUI's attention broadcasts it, in chunks."""
    dc = pack_module("nodes.glue.dit_capture")
    gen = torch.Generator().manual_seed(3)
    b, heads, length, d = 2, 2, 14, 4
    q, k = torch.randn(2, b, heads, length, d, generator=gen, dtype=torch.float64)
    full = {"key": (b, 1, length), "per-row": (b, length, length), "shared": (length, length)}[shape]
    mask = torch.where(torch.rand(full, generator=gen) > 0.3, 0.0, float("-inf")).double()
    mask[..., 0] = 0.0  # every query keeps a key
    image, text = slice(5, 14), slice(0, 5)
    got = dc.text_probabilities(q, k, image, text, mask, dc.Chunking(4, 3))
    kernel = mask.unsqueeze(0) if mask.ndim == 2 else mask
    kernel = kernel.unsqueeze(1)  # as attention_pytorch: (B or 1, 1, rows, L)
    expect = (q @ k.transpose(-1, -2) / math.sqrt(d) + kernel).softmax(-1)[:, :, image, text]
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


# -- two flow behaviours ------------------------------------------------------------------------------------------


def test_noise_blend_on_a_flow_model_uses_the_level_t(run, dino, monkeypatch):  # noqa: F811
    """DiffuseIT's noise-blended estimate on Flux decodes ``t x0 + (1 - t) x_t`` (the flow latent's noise level is
    ``t`` and its input scale 1), not the VP ``sigma / sqrt(1 + sigma^2)`` mix."""
    dn = pack_module("nodes.classes.diffuseit_nodes")
    diffuseit = pack_module("zerocon_core.diffuseit.guidance")
    model, vae = tm.flux(), tm.flow_vae(0)
    src = image(4)
    lat = encode(vae, src)
    terms = structure(dn, run, model, vae, dino, src, noise_blend=True, lambda_semantic=0.0)
    blended = [t for t in terms if getattr(t, "noise_blend", False)]
    assert blended and all(t.prediction_type == "flow" for t in blended)
    seen = []
    real = diffuseit._DecodedTerm._decoded

    def spy(self, ctx, blend=False):
        decode = self.decode

        def recording(latent):
            seen.append((blend, ctx.x.detach().clone(), ctx.x0.detach().clone(), float(ctx.sigma), latent.detach()))
            return decode(latent)

        object.__setattr__(self, "decode", recording)
        try:
            return real(self, ctx, blend)
        finally:
            object.__setattr__(self, "decode", decode)

    monkeypatch.setattr(diffuseit._DecodedTerm, "_decoded", spy)
    pos, neg = tm.flow_conditioning(1), tm.flow_conditioning(2)
    kw = dict(
        model=model, positive=pos, negative=neg, latent=lat, steps=4, cfg=1.0, strength=0.6, resample=1, seed=3,
        step_mode="raw", step_size=0.02,
    )  # fmt: skip
    run(dn.ZeroConDiffuseITSampler, guidance=terms, **kw)
    mixes = [s for s in seen if s[0]]
    assert mixes, "no blended decode"
    for _, x, x0, t, latent in mixes:
        assert 0 < t < 1
        torch.testing.assert_close(latent, t * x0 + (1 - t) * x, rtol=0, atol=1e-6)
        f_vp = t / math.sqrt(1 + t * t)
        vp = f_vp * x0 + (1 - f_vp) * x / math.sqrt(1 + t * t)
        assert float((latent - vp).abs().max()) > 1e-3


def test_pix2pix_zero_branches_at_cfg_1_take_the_edit_noise_from_the_edit_copy(zc, run, monkeypatch):
    """Branches "pix2pix-zero" with cfg 1 (Flux-dev): the step's noise is the edit's prediction on the edit copy
    (copy 1), not on the negative's copy that is carried on, so the result differs from predicting the edit on copy
    0; the two copies differ at guided steps."""
    model = tm.flux_dev()
    source, edit = tm.flow_conditioning(1, guidance=3.5), tm.flow_conditioning(2, guidance=3.5)
    _, inversion, _ = h.invert(zc, run, model, tm.flow_latent(4, size=8), source, steps=3)
    calls = []
    real = zc.denoiser.ComfyDenoiser.predict
    edit_text = edit[0][0]

    def is_edit(cond) -> bool:
        text = cond[0]["model_conds"]["c_crossattn"].cond
        return text.shape == edit_text.shape and torch.equal(text.cpu(), edit_text)

    def spy(self, x, sigma, conds, capture=None):
        if not torch.is_grad_enabled() and len(conds) == 1:
            calls.append((is_edit(conds[0]), float(sigma), x.detach().clone()))
        return real(self, x, sigma, conds, capture)

    monkeypatch.setattr(zc.denoiser.ComfyDenoiser, "predict", spy)
    g = h.guidance(zc, run, xa=1.0, nce=0.0)
    h.guided(zc, run, model, inversion, edit, cfg=1.0, branches="pix2pix-zero", step_mode="raw", guidance=g)
    edits = [(s, x) for flag, s, x in calls if flag]
    others = [(s, x) for flag, s, x in calls if not flag]
    assert edits and others
    for s, x in edits:  # the edit copy is neither the negative's copy nor the reference latent
        same_level = [o for so, o in others if so == s]
        assert same_level and all(float((x - o).abs().max()) > 1e-6 for o in same_level), s


# -- families that stay refused -------------------------------------------------------------------------------------


@chroma
def test_chroma_radiance_stays_refused(zc):
    """Chroma Radiance (pixel space) is another model_base / config class: the Chroma adapter does not claim it."""
    import comfy.model_base
    import comfy.supported_models

    model = tf.chroma()
    model.model.__class__ = comfy.model_base.ChromaRadiance
    model.model.model_config.__class__ = comfy.supported_models.ChromaRadiance
    with pytest.raises(zc.families.UnsupportedModelError, match=r"this MODEL is a Chroma network \(ChromaRadiance\)"):
        zc.families.detect_family(model)


def test_a_flux2_latent_into_a_flux1_model_names_the_expected_channels(zc, run):
    """A Flux.2 LATENT (128 channels, /16) into a Flux.1 MODEL: the error names the 16 channels Flux needs and the
    shape it got (the reverse, a Flux.1 latent into Flux.2, is refused by the MODEL check above)."""
    latent = {"samples": torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(0))}  # not empty
    with pytest.raises(
        ValueError, match=r"Flux needs a 16-channel image latent \(B, 16, H, W\); got shape \(1, 128, 4, 4\)"
    ):
        h.invert(zc, run, tm.flux(), latent, tm.flow_conditioning(1), steps=2)
