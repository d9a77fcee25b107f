"""Flux (schnell- and dev-like) and SD3 MODELs through the pack's nodes, on tiny MM-DiTs built from ComfyUI's classes.

- family detection, the sampling grid (ComfyUI's "simple" over the model's own shifted sigmas, checked against
  the shift formula) and the families that stay refused;
- guidance off, our inversion and sampler equal ComfyUI's stock ``euler`` on the same flipped / normal sigmas
  (inversion: the stock KSAMPLER on the flipped grid short of sigma 1, where ComfyUI's flow scaling is defined, and
  stock ``sample_euler`` on the whole grid; sampling: a stock CFGGuider + ``euler`` from x_T), within 1e-5;
- the MODEL is left exactly as it was after a guided and after an interrupted run;
- clear errors: a Flux inversion sampled with SD3, wrong latent channels, the "next" convention on flow.
"""

from __future__ import annotations

import dataclasses

import comfy.model_management
import pytest
import robust_helpers as rh
import sampling_helpers as h
import tiny_models as tm
import torch
from test_sampling_cleanup import _snapshot

STEPS = 4
#: kind -> (builder, cfg of the edit, Flux-dev guidance value in the conditionings or None)
FLOW = {"flux": (tm.flux, 1.0, None), "flux_dev": (tm.flux_dev, 1.0, 3.5), "sd3": (tm.sd3, 4.0, None)}


def _conds(kind):
    g = FLOW[kind][2]
    return tm.flow_conditioning(1, guidance=g), tm.flow_conditioning(2, guidance=g)


# -- families and grids ---------------------------------------------------------------------------------------


def test_flow_families_are_detected(zc):
    fam = zc.families.detect_family
    schnell, dev, sd3 = fam(tm.flux()), fam(tm.flux_dev()), fam(tm.sd3())
    assert (schnell.name, schnell.prediction_type, schnell.latent_channels, schnell.cfg_style) == (
        "Flux",
        "flow",
        16,
        "cfg",
    )
    assert (dev.name, dev.cfg_style, str(dev)) == ("Flux", "distilled", "Flux-dev (flow matching, guidance-distilled)")
    assert (sd3.name, sd3.prediction_type, sd3.latent_channels, sd3.cfg_style) == ("SD3", "flow", 16, "cfg")
    assert schnell.native_size == dev.native_size == sd3.native_size == 1024
    assert (schnell.tiny_decoder, sd3.tiny_decoder) == ("taef1", "taesd3")


@pytest.mark.parametrize(
    "build, what",
    [
        (tm.flux_fill, "a Flux variant with 96 input channels"),
        (tm.sd15_inpaint, "an inpainting / image-conditioned variant"),
    ],
)
def test_other_variants_keep_the_clear_error(zc, build, what):
    with pytest.raises(zc.families.UnsupportedModelError) as err:
        zc.families.detect_family(build())
    msg = str(err.value)
    assert (
        "ZeroCon supports SD1.x, SD2.x (eps or v-prediction), SDXL, SD3/SD3.5, Flux, Flux.2, Chroma, Qwen-Image and Z-Image models only"
        in msg
    )
    assert what in msg


def test_flow_model_sampled_otherwise_is_refused(zc):
    """An SD3 network patched to a VP schedule (ModelSamplingDiscrete) is not a flow model any more."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    with torch.inference_mode():
        (patched,) = ModelSamplingDiscrete().patch(tm.sd3(), "eps", False)
    with pytest.raises(zc.families.UnsupportedModelError, match="sampled as eps-prediction"):
        zc.families.detect_family(patched)


def test_sd_unet_patched_to_flow_sampling_is_refused(zc):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    with torch.inference_mode():
        (patched,) = ModelSamplingSD3().patch(tm.sd15(), 3.0)
    with pytest.raises(zc.families.UnsupportedModelError, match="SD1.x UNet patched to flow-matching sampling"):
        zc.families.detect_family(patched)


@pytest.mark.parametrize("kind, shift", [("sd3", 3.0), ("flux", None)])
def test_grid_is_the_models_simple_schedule(zc, kind, shift):
    model = FLOW[kind][0]()
    ms = model.get_model_object("model_sampling")
    grid = zc.sampling.ddim_grid(ms, STEPS)
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    with torch.inference_mode():
        stock = BasicScheduler().get_sigmas(model, "simple", STEPS, 1.0)[0]
    assert torch.equal(grid, stock)
    t = torch.linspace(1.0, 0.0, STEPS + 1, dtype=torch.float64)
    if shift is not None:  # SD3: time_snr_shift, t' = shift t / (1 + (shift - 1) t)
        expected = shift * t / (1 + (shift - 1) * t)
    else:  # Flux: exp(mu) / (exp(mu) + (1 / t - 1)), mu = the model's shift (1.15)
        mu = float(ms.shift)
        expected = torch.where(t > 0, torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / t - 1)), t)
    torch.testing.assert_close(grid.double(), expected, rtol=0, atol=1e-6)
    assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0


def test_next_convention_is_refused_on_flow(zc, run):
    with pytest.raises(ValueError, match="flow-matching models .* invert with 'current'"):
        h.invert(zc, run, tm.flux(), tm.flow_latent(3, size=8), tm.flow_conditioning(1), convention="next")


# -- guidance off equals ComfyUI's stock euler ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FLOW))
def test_inversion_equals_stock_euler_on_flipped_sigmas(zc, run, kind):
    model = FLOW[kind][0]()
    source, _ = _conds(kind)
    lat = tm.flow_latent(3, size=8)
    x_t, _, sigmas = h.invert(zc, run, model, lat, source, steps=STEPS)
    up = h.flip(sigmas)
    fmt = model.model.latent_format
    # (1) stock KSAMPLER "euler" short of sigma 1 (ComfyUI then divides by 1 - sigma_last, which we undo)
    h.assert_inversion_equals_stock_euler_short_of_1(zc, model, source, lat, up)
    # (2) the whole grid: stock sample_euler's own result (ComfyUI's scaling out divides it by 1 - 1)
    last = h.stock_euler_last(model, source, lat, up)
    torch.testing.assert_close(x_t["samples"], fmt.process_out(last), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(FLOW))
def test_guided_sampler_without_guidance_equals_stock_euler(zc, run, kind):
    """Sampling down from x_T: the stock guider with x_T as its 'noise' (at sigma 1 ComfyUI's flow scaling keeps
    the noise only), euler, cfg between the source (the default negative) and the edit."""
    build, cfg, _ = FLOW[kind]
    model = build()
    source, edit = _conds(kind)
    _, inversion, sigmas = h.invert(zc, run, model, tm.flow_latent(4, size=8), source, steps=STEPS)
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=cfg)
    stock = h.stock_euler_from_inversion(model, edit, source, cfg, inversion, sigmas)
    torch.testing.assert_close(out["samples"], stock, rtol=0, atol=1e-5)
    assert float((out["samples"] - inversion.latent).abs().max()) > 0.1  # it did sample


def test_distilled_guidance_value_reaches_the_model(zc, run):
    """Flux-dev reads the conditioning's guidance value: another value, another result (and the same through the
    stock path, checked above)."""
    model = tm.flux_dev()
    lat = tm.flow_latent(5, size=8)
    a, _, _ = h.invert(zc, run, model, lat, tm.flow_conditioning(1, guidance=1.0))
    b, _, _ = h.invert(zc, run, model, lat, tm.flow_conditioning(1, guidance=6.0))
    assert float((a["samples"] - b["samples"]).abs().max()) > 1e-4


def test_cfg_on_a_distilled_model_is_warned_about(zc, run, caplog):
    model = tm.flux_dev()
    source, edit = _conds("flux_dev")
    _, inversion, _ = h.invert(zc, run, model, tm.flow_latent(6, size=8), source, steps=2)
    with caplog.at_level("WARNING", logger="zerocon"):
        h.guided(zc, run, model, inversion, edit, cfg=3.0)
    assert any("guidance-distilled: use cfg 1" in r.getMessage() for r in caplog.records)


# -- the MODEL is left as it was ------------------------------------------------------------------------------


def _x0_energy(zc):
    """A guidance term on the predicted clean latent (no captures): its gradient goes through the whole DiT."""
    base = zc.guidance.GuidanceTerm

    @dataclasses.dataclass(frozen=True)
    class X0Energy(base):
        def loss(self, ctx, request):
            return ctx.x0.float().pow(2).mean()

    return X0Energy(weight=0.5)


def _assert_untouched(model, before, reference, pos, neg, lat, **sampling):
    """The MODEL's tensors are the very same inference tensors with the same flags, its options and object patches
    the same, and the stock KSampler (``sampling``: its cfg...) gives ``reference`` again."""
    after = _snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, t in after["tensors"].items():
        assert t is before["tensors"][name] and t.is_inference(), name
        assert t.requires_grad == before["requires_grad"][name], name
    assert after["options"] == before["options"] and after["object_patches"] == before["object_patches"]
    assert torch.equal(h.ksampler(model, pos, neg, lat, **sampling), reference)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_guided_and_interrupted_runs_leave_the_model_as_it_was(zc, run, kind, monkeypatch):
    build, cfg, _ = FLOW[kind]
    model = build()
    source, edit = _conds(kind)
    lat = tm.flow_latent(7, size=8)
    _, inversion, _ = h.invert(zc, run, model, lat, source, steps=3)
    reference = h.ksampler(model, edit, source, lat)
    before = _snapshot(model)
    term = _x0_energy(zc)
    seen_grad = []
    real_session = zc.denoiser.ComfyDenoiser.autograd_session

    def session(self):  # the weights autograd sees never require grad
        ctx = real_session(self)

        class Spy:
            def __enter__(s):
                out = ctx.__enter__()
                seen_grad.extend(p.requires_grad for p in self.model.parameters())
                return out

            def __exit__(s, *exc):
                return ctx.__exit__(*exc)

        return Spy()

    monkeypatch.setattr(zc.denoiser.ComfyDenoiser, "autograd_session", session)
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=cfg, guidance=(term,))
    plain, _ = h.guided(zc, run, model, inversion, edit, cfg=cfg)
    assert seen_grad and not any(seen_grad)
    assert torch.isfinite(out["samples"]).all()
    assert float((out["samples"] - plain["samples"]).abs().max()) > 1e-4  # the gradient step moved the latent
    _assert_untouched(model, before, reference, edit, source, lat)

    rh.interrupt_at_step(monkeypatch, zc, 1)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        h.guided(zc, run, model, inversion, edit, cfg=cfg, guidance=(term,))
    monkeypatch.undo()
    comfy.model_management.interrupt_current_processing(False)
    _assert_untouched(model, before, reference, edit, source, lat)


# -- bad input ------------------------------------------------------------------------------------------------------


def test_flux_inversion_sampled_with_sd3_is_a_clear_error(zc, run):
    _, inversion, _ = h.invert(zc, run, tm.flux(), tm.flow_latent(8, size=8), tm.flow_conditioning(1), steps=2)
    with pytest.raises(
        ValueError,
        match="inversion was made with a Flux model but this MODEL is SD3; .*needs a latent inverted with SD3",
    ):
        h.guided(zc, run, tm.sd3(), inversion, tm.flow_conditioning(2))


def test_wrong_latent_channels_name_the_expected_ones(zc, run):
    with pytest.raises(
        ValueError, match=r"Flux needs a 16-channel image latent \(B, 16, H, W\); got shape \(1, 4, 8, 8\)"
    ):
        h.invert(zc, run, tm.flux(), tm.latent(9, size=8), tm.flow_conditioning(1))
    with pytest.raises(ValueError, match=r"SD1.x needs a 4-channel image latent \(B, 4, H, W\)"):
        h.invert(zc, run, tm.sd15(), tm.flow_latent(9, size=8), tm.conditioning(1))


def test_guider_and_guided_ddim_sampler_in_sampler_custom_advanced(zc, run):
    """The GUIDER + SAMPLER pair with DisableNoise and the inversion's SIGMAS gives the Guided Sampler's edit: the
    inverted latent enters at sigma 1 as it is (ComfyUI's flow scaling would have zeroed it)."""
    model = tm.sd3()
    source, edit = _conds("sd3")
    x_t, inversion, sigmas = h.invert(zc, run, model, tm.flow_latent(10, size=8), source, steps=STEPS)
    node_edit, _ = h.guided(zc, run, model, inversion, edit, cfg=4.0, reference="resampled")
    (guider,) = run(zc.sampling.ZeroConGuiderNode, model=model, edited=edit, source=source, cfg=4.0)
    sampler = h.ddim_sampler_node(zc, run)
    out, _ = h.sample_custom_advanced(guider, sampler, sigmas, x_t)
    torch.testing.assert_close(out["samples"], node_edit["samples"], rtol=0, atol=1e-6)


def test_regularised_flow_inversion(zc, run):
    """The regulariser on the implied noise runs on a flow model (16 x 16 latent: on 8 x 8 its steps are far larger
    than at real sizes) and changes x_T."""
    model = tm.flux()
    lat, source = tm.flow_latent(11, size=16), tm.flow_conditioning(1)
    plain, _, _ = h.invert(zc, run, model, lat, source, steps=STEPS)
    reg, _, _ = h.invert(zc, run, model, lat, source, steps=STEPS, regularize=True)
    assert torch.isfinite(reg["samples"]).all()
    assert float((reg["samples"] - plain["samples"]).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", sorted(FLOW))
def test_inversion_then_sampling_reconstructs_and_the_error_shrinks_with_steps(zc, run, kind):
    """DDIM Inversion then the Guided Sampler (no guidance, the caption as the edit, cfg 1): the start latent comes
    back, the error about halving per doubling of the steps (Euler is first order)."""
    model = FLOW[kind][0]()
    lat = tm.flow_latent(12, size=8)
    cond = tm.flow_conditioning(2, guidance=FLOW[kind][2])
    errors = []
    for steps in (16, 32, 64, 128):
        _, inversion, _ = h.invert(zc, run, model, lat, cond, steps=steps)
        out, _ = h.guided(zc, run, model, inversion, cond, cfg=1.0)
        errors.append(float((out["samples"] - lat["samples"]).abs().max()))
    assert all(0.35 < b / a < 0.62 for a, b in zip(errors, errors[1:])), errors
