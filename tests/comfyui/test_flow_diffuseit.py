"""DiffuseIT on flow-matching families (Flux, Flux-dev, SD3): the DINO terms decode the predicted clean latent with
a 16-channel VAE (a tiny AutoencoderKL, or a tiny TAEF1 / TAESD3 loaded as ComfyUI's Load VAE loads them), the
start level is DiffuseIT's SNR mapped onto the flow grid, and the run leaves the MODEL, the VAE and DINO as they
were."""

from __future__ import annotations

import math

import pytest
import sampling_helpers as h
import tiny_models as tm
import torch
from conftest import pack_fixture
from test_diffuseit_nodes import dino, dino_nodes, encode, image, sampler_inputs, structure, style  # noqa: F401  (fixtures)

FLOW = {"flux": (tm.flux, 1.0, None), "flux_dev": (tm.flux_dev, 1.0, 3.5), "sd3": (tm.sd3, 3.0, None)}


dn = pack_fixture("nodes.classes.diffuseit_nodes")


@pytest.fixture(scope="module")
def vae16():
    return tm.flow_vae(0)


def tiny_taesd16(name: str, seed: int = 0):
    """A TAEF1 / TAESD3-shaped tiny decoder (ComfyUI's TAESD with 16 latent channels, seeded random weights) as
    Load VAE builds it (its scale and shift included)."""
    import comfy.sd
    import comfy.taesd.taesd

    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        model = comfy.taesd.taesd.TAESD(latent_channels=16)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5 if p.ndim > 1 else 0 * p)
        parts = ("taesd_encoder.", "taesd_decoder.")
        sd = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(parts)}
    scale, shift = {"taef1": (0.3611, 0.1159), "taesd3": (1.5305, 0.0609)}[name]
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(scale), torch.tensor(shift)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=sd)


def sample(dn, run, kind, model, latent, guidance, **over):
    _, cfg, g = FLOW[kind]
    conds = dict(positive=tm.flow_conditioning(1, guidance=g), negative=tm.flow_conditioning(2, guidance=g), cfg=cfg)
    return run(dn.ZeroConDiffuseITSampler, **sampler_inputs(model, latent, guidance, **{**conds, **over}))[0]


@pytest.mark.parametrize("kind", sorted(FLOW))
def test_diffuseit_sampler_on_flow_families(dn, run, kind, vae16, dino):  # noqa: F811
    model = FLOW[kind][0]()
    src = image(4)
    lat = encode(vae16, src)
    assert lat["samples"].shape[1] == 16
    guidance = style(dn, run, model, vae16, dino, image(5), previous=structure(dn, run, model, vae16, dino, src))
    assert all(t.prediction_type == "flow" for t in guidance)
    modules = (vae16.first_stage_model, dino.model, model.model)
    before = [[(id(p), p.is_inference(), p.requires_grad) for p in m.parameters()] for m in modules]
    reference = h.ksampler(model, tm.flow_conditioning(1), tm.flow_conditioning(2), tm.flow_latent(0, size=8))
    plain = sample(dn, run, kind, model, lat, structure(dn, run, model, vae16, dino, src, weight=0.0))
    out = sample(dn, run, kind, model, lat, guidance)
    again = sample(dn, run, kind, model, lat, guidance)
    assert out["samples"].shape == lat["samples"].shape and torch.isfinite(out["samples"]).all()
    assert torch.equal(out["samples"], again["samples"])  # seeded
    assert float((out["samples"] - plain["samples"]).abs().max()) > 1e-4, "DINO guidance did not move the latent"
    after = [[(id(p), p.is_inference(), p.requires_grad) for p in m.parameters()] for m in modules]
    assert after == before
    again_ref = h.ksampler(model, tm.flow_conditioning(1), tm.flow_conditioning(2), tm.flow_latent(0, size=8))
    assert torch.equal(reference, again_ref)  # a stock sampler is bit-identical after the run


@pytest.mark.parametrize("kind, tiny", [("flux", "taef1"), ("sd3", "taesd3")])
def test_guidance_decodes_with_the_tiny_decoder(dn, run, kind, tiny, vae16, dino):  # noqa: F811
    model = FLOW[kind][0]()
    taesd = tiny_taesd16(tiny)
    assert taesd.latent_channels == 16
    src = image(6)
    guidance = structure(dn, run, model, taesd, dino, src, lambda_semantic=0.0)
    assert type(guidance[0].decode.vae.first_stage_model).__name__ == "TAESD"
    out = sample(dn, run, kind, model, encode(vae16, src), guidance, resample=1)
    plain = sample(dn, run, kind, model, encode(vae16, src), structure(dn, run, model, taesd, dino, src, weight=0.0))
    assert torch.isfinite(out["samples"]).all()
    assert float((out["samples"] - plain["samples"]).abs().max()) > 1e-4


def test_auto_strength_starts_at_diffuseits_snr(dn, run, vae16, dino, monkeypatch):  # noqa: F811
    """strength -1 on a flow model: the grid level whose SNR ((1 - t) / t)^2 is nearest (in log) to ADM's at
    DiffuseIT's start (1 / 5.985^2), computed here from ComfyUI's own simple grid."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    model = tm.sd3()
    steps = 20
    with torch.inference_mode():
        grid = BasicScheduler().get_sigmas(model, "simple", steps, 1.0)[0]
    target = math.log(1 / 5.985**2)
    dist = [abs(math.log(((1 - t) / t) ** 2) - target) if 0 < t < 1 else math.inf for t in grid[:-1].tolist()]
    expected = float(grid[min(range(len(dist)), key=dist.__getitem__)])
    seen = []
    real = dn.guided_function

    def spy(model_k, x, sigmas, *args, **kwargs):
        seen.append(float(sigmas[0]))
        return real(model_k, x, sigmas, *args, **kwargs)

    monkeypatch.setattr(dn, "guided_function", spy)
    src = image(7)
    guidance = structure(dn, run, model, vae16, dino, src, lambda_semantic=0.0)
    sample(dn, run, "sd3", model, encode(vae16, src), guidance, strength=-1.0, resample=1, steps=steps)
    assert seen == [pytest.approx(expected)]
    assert 0.83 < expected < 0.88  # t = 5.985 / 6.985


def test_vae_of_another_family_names_the_tiny_decoder(dn, run, dino):  # noqa: F811
    import tiny_clip

    with pytest.raises(
        ValueError, match=r"this VAE makes 4-channel image latents but the MODEL is Flux.*16-channel.*taef1 for Flux"
    ):
        structure(dn, run, tm.flux(), tiny_clip.vae(0), dino, image(1))


def test_guidance_built_for_flux_sampled_with_sd3_is_an_error(dn, run, vae16, dino):  # noqa: F811
    src = image(8)
    guidance = structure(dn, run, tm.flux(), vae16, dino, src)
    with pytest.raises(ValueError, match="built for a Flux MODEL but this MODEL is SD3"):
        sample(dn, run, "sd3", tm.sd3(), encode(vae16, src), guidance)


def test_dino_terms_in_the_guided_sampler_after_a_flow_inversion(zc, dn, run, vae16, dino):  # noqa: F811
    model = tm.flux()
    src = image(9)
    _, inversion, _ = h.invert(zc, run, model, encode(vae16, src), tm.flow_conditioning(1), steps=3)
    plain, _ = h.guided(zc, run, model, inversion, tm.flow_conditioning(2), cfg=1.0)
    guided, recon = h.guided(
        zc,
        run,
        model,
        inversion,
        tm.flow_conditioning(2),
        cfg=1.0,
        guidance=structure(dn, run, model, vae16, dino, src),
    )
    assert torch.isfinite(guided["samples"]).all() and torch.isfinite(recon["samples"]).all()
    assert float((guided["samples"] - plain["samples"]).abs().max()) > 1e-4
