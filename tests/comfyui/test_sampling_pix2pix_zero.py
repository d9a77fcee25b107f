"""branches="pix2pix-zero" through the nodes: the Guided Sampler runs the engine's two-copy update (equal to
the engine called directly inside ComfyUI's sampler), which differs from "edit" and "both"; the GUIDER +
SAMPLER pair gives the same result; without guidance every mode is the same plain edit."""

from __future__ import annotations

import comfy.samplers
import sampling_helpers as h
import tiny_models as tm
import torch
from conftest import pack_module

XA = 1.0  # large enough on the tiny model for the modes to differ clearly


def _engine(zc, model, inversion, edit, guidance, branches: str) -> torch.Tensor:
    """guided_ddim_sample called directly on a ComfyDenoiser inside CFGGuider.sample (the engine run)."""
    sampler = pack_module("zerocon_core.method.sampler")
    guider = zc.sampling.ZeroConGuider(model)
    guider.set_zerocon(edit, inversion.source, None, cfg=5.0, guidance=guidance)

    def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        g = model_k.inner_model
        den = zc.sampling._denoiser(g, extra_args)
        with torch.inference_mode(False):
            res = sampler.guided_ddim_sample(
                den,
                x.clone(),
                sigmas.clone(),
                source_cond=g.conds["source"],
                edit_cond=g.conds["positive"],
                guidance=tuple(guidance),
                settings=sampler.SamplerSettings(cfg=5.0, branches=branches),
            )
        return res.latent

    latent = inversion.latent
    with torch.inference_mode():
        return guider.sample(
            torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(function), inversion.sigmas
        ).clone()


def test_guided_sampler_pix2pix_zero_is_the_engine_and_differs_from_edit(zc, run, sd15_model):
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    _, inversion, _ = h.invert(zc, run, sd15_model, lat, cap)
    (guidance,) = run(zc.guidance.ZeroConCrossAttentionGuidance, weight=XA, layers="all", start=0.0, end=1.0)

    out = {b: h.guided(zc, run, sd15_model, inversion, edit, guidance=guidance, branches=b) for b in ("edit", "both")}
    p2pz, recon = h.guided(zc, run, sd15_model, inversion, edit, guidance=guidance, branches="pix2pix-zero")
    engine = _engine(zc, sd15_model, inversion, edit, guidance, "pix2pix-zero")
    scale = float(engine.abs().max())
    torch.testing.assert_close(p2pz["samples"] / scale, engine / scale, rtol=0, atol=1e-6)
    plain, plain_recon = h.guided(zc, run, sd15_model, inversion, edit)
    effect = float((p2pz["samples"] - plain["samples"]).norm())
    assert effect > 1e-3 * float(plain["samples"].norm()), "guidance did not move the latent"
    for b, (latent, _) in out.items():
        assert float((latent["samples"] - p2pz["samples"]).norm()) > 0.1 * effect, b
    # the same reference branch: equal up to float32 round-off (with guidance its forwards capture the maps, and the
    # capturing attention computes the probabilities explicitly instead of the fused kernel)
    recon_scale = float(plain_recon["samples"].abs().max())
    torch.testing.assert_close(recon["samples"] / recon_scale, plain_recon["samples"] / recon_scale, rtol=0, atol=1e-5)


def test_guider_and_sampler_pair_runs_pix2pix_zero(zc, run, sd15_model):
    lat, cap, edit = tm.latent(33), tm.conditioning(34), tm.conditioning(35)
    x_t, inversion, sigmas = h.invert(zc, run, sd15_model, lat, cap)
    (guidance,) = run(zc.guidance.ZeroConCrossAttentionGuidance, weight=XA, layers="all", start=0.0, end=1.0)
    (guider,) = run(
        zc.sampling.ZeroConGuiderNode, model=sd15_model, edited=edit, source=cap, cfg=5.0, guidance=guidance
    )
    sampler = h.ddim_sampler_node(zc, run, branches="pix2pix-zero")
    pair, _ = h.sample_custom_advanced(guider, sampler, sigmas, x_t)
    node, _ = h.guided(zc, run, sd15_model, inversion, edit, guidance=guidance, branches="pix2pix-zero")
    torch.testing.assert_close(pair["samples"], node["samples"], rtol=1e-5, atol=1e-5)


def test_without_guidance_every_mode_is_the_plain_edit(zc, run, sd15_model):
    lat, cap, edit = tm.latent(36), tm.conditioning(37), tm.conditioning(38)
    _, inversion, _ = h.invert(zc, run, sd15_model, lat, cap)
    outs = [h.guided(zc, run, sd15_model, inversion, edit, branches=b)[0]["samples"] for b in ("edit", "pix2pix-zero")]
    assert torch.equal(outs[0], outs[1])
