"""Bad inputs to the sampling nodes fail early with a message that says what to do."""

from __future__ import annotations

import comfy.samplers
import pytest
import sampling_helpers as h
import tiny_models as tm
import torch


def test_inversion_latent_size_differs_from_the_samplers_latent(zc, run, sd15_model):
    _, inversion, _ = h.invert(zc, run, sd15_model, tm.latent(40), tm.conditioning(41))
    with pytest.raises(
        ValueError, match=r"inversion latent size \[1, 4, 16, 16\] differs from the LATENT \[1, 4, 24, 24\]"
    ):
        h.guided(zc, run, sd15_model, inversion, tm.conditioning(42), latent=tm.latent(43, size=24))


def test_batch_mismatch_latent_vs_conditioning_in_inversion(zc, run, sd15_model):
    with pytest.raises(
        ValueError, match=r"batch mismatch: the latent batch has 2 image\(s\) but the caption conditioning has batch 3"
    ):
        h.invert(zc, run, sd15_model, tm.latent(44, batch=2), tm.conditioning(45, batch=3))


def test_batch_mismatch_latent_vs_conditioning_in_guided_sampler(zc, run, sd15_model):
    _, inversion, _ = h.invert(zc, run, sd15_model, tm.latent(46, batch=2), tm.conditioning(47))
    with pytest.raises(
        ValueError, match=r"batch mismatch: the latent batch has 2 image\(s\) but the edited conditioning has batch 3"
    ):
        h.guided(zc, run, sd15_model, inversion, tm.conditioning(48, batch=3))


def test_batch_mismatch_in_sampler_custom_advanced(zc, run, sd15_model):
    (guider,) = run(
        zc.sampling.ZeroConGuiderNode,
        model=sd15_model,
        edited=tm.conditioning(62),
        source=tm.conditioning(63, batch=2),
        cfg=5.0,
    )
    sampler = h.ddim_sampler_node(zc, run)
    with pytest.raises(ValueError, match=r"latent batch has 3 image\(s\) but the source conditioning has batch 2"):
        h.sample_custom_advanced(guider, sampler, h.ddim_sigmas(sd15_model, 3), tm.latent(64, batch=3))


def test_unsupported_model_family(zc, run):
    fill = tm.flux_fill()
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with pytest.raises(
        ValueError,
        match=r"ZeroCon supports SD1\.x, SD2\.x \(eps or v-prediction\), SDXL, SD3/SD3\.5, Flux, Flux\.2, Chroma, Qwen-Image and Z-Image models only; "
        r"this MODEL is a Flux variant with 96 input channels",
    ):
        h.invert(zc, run, fill, latent, tm.conditioning(49))
    with pytest.raises(zc.families.UnsupportedModelError, match="and Z-Image models only"):
        run(zc.sampling.ZeroConGuiderNode, model=fill, edited=tm.conditioning(50), source=tm.conditioning(51), cfg=5.0)


def test_unsupported_sampling_patch(zc, sd15_model):
    """A supported UNet patched to a non-DDPM schedule (e.g. ModelSamplingDiscrete 'lcm'/EDM) is refused."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    with torch.inference_mode():
        (patched,) = ModelSamplingContinuousEDM().patch(sd15_model, "eps", 120.0, 0.002)
    with pytest.raises(zc.families.UnsupportedModelError, match="discrete DDPM noise schedule"):
        zc.families.detect_family(patched)


def test_model_family_mismatch_between_inversion_and_sampler(zc, run, sd15_model, sdxl_model):
    _, inversion, _ = h.invert(zc, run, sd15_model, tm.latent(52), tm.conditioning(53))
    with pytest.raises(ValueError, match="inversion was made with an SD1.x model but this MODEL is SDXL"):
        h.guided(zc, run, sdxl_model, inversion, tm.conditioning(54, pooled=True))


def test_wrong_latent_channels(zc, run, sd15_model):
    with pytest.raises(ValueError, match=r"SD1.x needs a 4-channel image latent"):
        h.invert(zc, run, sd15_model, {"samples": torch.randn(1, 16, 8, 8)}, tm.conditioning(55))


def test_inversion_cfg_needs_a_negative(zc, run, sd15_model):
    with pytest.raises(ValueError, match="cfg other than 1 needs a negative"):
        h.invert(zc, run, sd15_model, tm.latent(56), tm.conditioning(57), cfg=2.0)


def test_guided_sampler_needs_the_zerocon_guider(zc, run, sd15_model):
    sampler = h.ddim_sampler_node(zc, run)
    guider = comfy.samplers.CFGGuider(sd15_model)
    guider.set_conds(tm.conditioning(58), tm.conditioning(59))
    with pytest.raises(ValueError, match="needs the ZeroCon Guider as its GUIDER"):
        h.sample_custom_advanced(guider, sampler, h.ddim_sigmas(sd15_model, 3), tm.latent(60))


def test_bad_guidance_settings(zc, run):
    with pytest.raises(ValueError, match="unknown block"):
        run(zc.guidance.ZeroConCrossAttentionGuidance, weight=0.1, layers="middle", start=0.0, end=1.0)
    with pytest.raises(ValueError, match="patch sizes must be integers"):
        run(
            zc.guidance.ZeroConPatchNCEGuidance,
            weight=0.1,
            layers="up",
            patches=16,
            tau=0.07,
            patch_sizes="1,x",
            start=0.0,
            end=1.0,
        )
    with pytest.raises(ValueError, match="guidance window"):
        run(zc.guidance.ZeroConCrossAttentionGuidance, weight=0.1, layers="all", start=0.8, end=0.2)


def test_inversion_rejects_not_an_inversion(zc, run, sd15_model):
    with pytest.raises(ValueError, match="must come from ZeroCon DDIM Inversion"):
        h.guided(zc, run, sd15_model, {"samples": torch.zeros(1, 4, 8, 8)}, tm.conditioning(61))
