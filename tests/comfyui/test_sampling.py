"""The sampling nodes inside real ComfyUI: equivalence with the stock DDIM path, guided runs, the
GUIDER + SAMPLER pair in SamplerCustomAdvanced, progress callbacks."""

from __future__ import annotations

import pytest
import sampling_helpers as h
import tiny_models as tm
import torch

STEPS = h.STEPS
MODELS = h.models()
_invert, _guided, _guidance = h.invert, h.guided, h.guidance


@pytest.mark.parametrize("name", list(MODELS))
def test_unguided_matches_stock_ddim(zc, run, name):
    """Inversion = stock ddim over FlipSigmas(ddim_uniform) (bit-exact); sampling = stock ddim with CFG."""
    build, pooled = MODELS[name]
    model = build()
    lat = tm.latent(0)
    cap, edit = tm.conditioning(1, pooled=pooled), tm.conditioning(2, pooled=pooled)

    sig = h.ddim_sigmas(model, STEPS)
    stock_xt = h.sampler_custom(model, cap, cap, lat, h.flip(sig), cfg=1.0)
    stock_edit = h.sampler_custom(model, edit, cap, stock_xt, sig, cfg=5.0)

    x_t, inversion, sigmas = _invert(zc, run, model, lat, cap)
    assert torch.equal(sigmas, sig)
    assert torch.equal(x_t["samples"], stock_xt["samples"])  # same Euler arithmetic in the same order
    assert inversion.shape == tuple(lat["samples"].shape)

    scale = stock_edit["samples"].abs().max()
    for guidance in (None, _guidance(zc, run, xa=0.0, nce=0.0)):
        edited, recon = _guided(zc, run, model, inversion, edit, guidance=guidance)
        torch.testing.assert_close(edited["samples"] / scale, stock_edit["samples"] / scale, rtol=0, atol=1e-5)
    # the reconstruction branch is a plain DDIM run with the caption (negative = source: CFG is a no-op)
    stock_recon = h.sampler_custom(model, cap, cap, stock_xt, sig, cfg=1.0)
    torch.testing.assert_close(recon["samples"], stock_recon["samples"], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_guided_run_changes_latent(zc, run, name):
    build, pooled = MODELS[name]
    model = build()
    lat = tm.latent(3)
    cap, edit = tm.conditioning(4, pooled=pooled), tm.conditioning(5, pooled=pooled)
    _, inversion, _ = _invert(zc, run, model, lat, cap)
    plain, _ = _guided(zc, run, model, inversion, edit)
    guided, recon = _guided(zc, run, model, inversion, edit, guidance=_guidance(zc, run))
    assert torch.isfinite(guided["samples"]).all() and torch.isfinite(recon["samples"]).all()
    diff = (guided["samples"] - plain["samples"]).abs().max()
    assert diff > 1e-3 * plain["samples"].abs().max(), "guidance did not move the latent"


@pytest.mark.parametrize("mode", ["normalized", "raw"])
def test_guided_modes_with_a_separate_negative(zc, run, sd15_model, mode):
    """branches="both" also guides the negative-conditioned half: its edit differs from "edit"'s by a measured
    share of what guidance moves the latent at all. The reconstruction (reference branch: CFG between the
    separate negative and the caption) does not depend on the branches, and differs from the caption-only
    reconstruction: the negative is really used. (tests/core/test_sampler_mutations.py checks "both"
    against the guided loop written out.)"""
    lat = tm.latent(6)
    cap, edit, neg = tm.conditioning(7), tm.conditioning(8), tm.conditioning(9, tokens=154)
    _, inversion, _ = _invert(zc, run, sd15_model, lat, cap)
    guidance = _guidance(zc, run)
    kw = dict(negative=neg, step_mode=mode)
    both, recon_both = _guided(zc, run, sd15_model, inversion, edit, branches="both", guidance=guidance, **kw)
    only, recon_edit = _guided(zc, run, sd15_model, inversion, edit, branches="edit", guidance=guidance, **kw)
    plain, _ = _guided(zc, run, sd15_model, inversion, edit, **kw)
    _, recon_caption = _guided(zc, run, sd15_model, inversion, edit, step_mode=mode, guidance=guidance)
    assert torch.isfinite(both["samples"]).all() and torch.isfinite(recon_both["samples"]).all()
    moved = float((only["samples"] - plain["samples"]).norm())
    # measured 0.15 (normalized), 0.52 (raw); 0.82 and 0.74 while PatchNCE drew other locations for each half
    assert float((both["samples"] - only["samples"]).norm()) > 0.1 * moved > 0
    torch.testing.assert_close(recon_both["samples"], recon_edit["samples"], rtol=0, atol=0)
    assert not torch.allclose(recon_both["samples"], recon_caption["samples"])


def test_regularised_inversion(zc, run, sd15_model):
    lat, cap = tm.latent(10), tm.conditioning(11)
    plain, _, _ = _invert(zc, run, sd15_model, lat, cap)
    reg, inv, _ = _invert(zc, run, sd15_model, lat, cap, regularize=True)
    again, _, _ = _invert(zc, run, sd15_model, lat, cap, regularize=True)
    assert torch.isfinite(reg["samples"]).all()
    assert not torch.equal(reg["samples"], plain["samples"])
    assert torch.equal(reg["samples"], again["samples"])  # seeded
    assert inv.regularization is not None


def test_batch_of_two_with_shared_conditioning(zc, run, sd15_model):
    lat = tm.latent(12, batch=2)
    cap, edit = tm.conditioning(13), tm.conditioning(14, batch=2)
    x_t, inversion, _ = _invert(zc, run, sd15_model, lat, cap)
    out, recon = _guided(zc, run, sd15_model, inversion, edit, guidance=_guidance(zc, run))
    assert out["samples"].shape == recon["samples"].shape == x_t["samples"].shape == (2, 4, 16, 16)


def test_sampler_custom_advanced_runs_the_method(zc, run, sd15_model):
    lat, cap, edit = tm.latent(15), tm.conditioning(16), tm.conditioning(17)
    x_t, inversion, sigmas = _invert(zc, run, sd15_model, lat, cap)
    guidance = _guidance(zc, run)
    (guider,) = run(
        zc.sampling.ZeroConGuiderNode, model=sd15_model, edited=edit, source=cap, cfg=5.0, guidance=guidance
    )
    sampler = h.ddim_sampler_node(zc, run)
    out, _ = h.sample_custom_advanced(guider, sampler, sigmas, x_t)
    node_out, _ = _guided(zc, run, sd15_model, inversion, edit, guidance=guidance)
    assert torch.isfinite(out["samples"]).all()
    torch.testing.assert_close(out["samples"], node_out["samples"], rtol=1e-5, atol=1e-5)


def test_guider_alone_is_plain_cfg_with_stock_samplers(zc, run, sd15_model):
    """With a stock sampler the ZeroCon Guider is ordinary CFG (edit vs negative = source)."""
    from comfy_extras.nodes_custom_sampler import KSamplerSelect

    lat, cap, edit = tm.latent(18), tm.conditioning(19), tm.conditioning(20)
    sig = h.ddim_sigmas(sd15_model, STEPS)
    (guider,) = run(zc.sampling.ZeroConGuiderNode, model=sd15_model, edited=edit, source=cap, cfg=5.0)
    ours, _ = h.sample_custom_advanced(guider, KSamplerSelect().get_sampler("ddim")[0], sig, lat)
    ref = h.sampler_custom(sd15_model, edit, cap, lat, sig, cfg=5.0)
    assert torch.equal(ours["samples"], ref["samples"])


def test_progress_callback_every_step(zc, run, sd15_model, monkeypatch):
    calls = []
    real = zc.sampling.progress.node_callback

    def recording(model, steps, x0_output=None):
        cb = real(model, steps, x0_output)

        def callback(step, x0, x, total):
            calls.append((step, total, tuple(x0.shape)))
            return cb(step, x0, x, total)

        return callback

    monkeypatch.setattr(zc.sampling.progress, "node_callback", recording)
    lat, cap = tm.latent(21), tm.conditioning(22)
    _, inversion, _ = _invert(zc, run, sd15_model, lat, cap)
    _guided(zc, run, sd15_model, inversion, tm.conditioning(23), guidance=_guidance(zc, run))
    expected = [(i, STEPS, (1, 4, 16, 16)) for i in range(STEPS)]
    assert calls == expected + expected


def test_auto_weights_follow_the_model_family(zc, sd15_model, sd2v_model, sdxl_model):
    g = zc.guidance
    fam = zc.families.detect_family
    terms = (
        g.CrossAttentionGuidance(weight=-1.0),
        g.PatchNCEGuidance(weight=-1.0),
        g.CrossAttentionGuidance(weight=0.3),
    )
    for model, xa, nce in ((sd15_model, 0.1, 0.5), (sdxl_model, 0.1, 0.5), (sd2v_model, 0.01, 0.05)):
        resolved = g.resolve_weights(terms, fam(model), "raw")
        assert [t.weight for t in resolved] == pytest.approx([xa, nce, 0.3])
        # step mode auto: ratios, the same on every family
        resolved = g.resolve_weights(terms, fam(model), "auto")
        assert [t.weight for t in resolved] == pytest.approx([1.0, 1.0, 0.3])


def test_v_prediction_guided_run(zc, run, sd2v_model):
    lat, cap, edit = tm.latent(24), tm.conditioning(25), tm.conditioning(26)
    _, inversion, _ = _invert(zc, run, sd2v_model, lat, cap)
    assert inversion.prediction_type == "v"
    out, _ = _guided(zc, run, sd2v_model, inversion, edit, guidance=_guidance(zc, run, xa=-1.0, nce=-1.0))
    assert torch.isfinite(out["samples"]).all()
