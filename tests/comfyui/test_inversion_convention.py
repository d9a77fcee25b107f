"""The DDIM Inversion node's ``convention`` choice: "current" (ComfyUI's FlipSigmas + ddim, the default) and
"next" (diffusers' DDIMInverseScheduler), on a tiny SD1.5-shaped ComfyUI model.

"next" is checked three ways: against diffusers' ``DDIMInverseScheduler.step`` formula written out here in
float64 over the model's own predictions (timesteps 1, 251, 501, 751 for 4 steps; the clean latent at
``alphas_cumprod[0]``, SD's ``set_alpha_to_one=False``), against the engine's ``ddim_invert(eval_at="next")``
run inside ComfyUI's sampler, and against "current", from which it must differ.
"""

from __future__ import annotations

import comfy.samplers
import pytest
import sampling_helpers as h
import tiny_models as tm
import torch

STEPS = 4  # 1000 // 4 = 250: ComfyUI's ddim_uniform visits timesteps 1, 251, 501, 751, as diffusers' "leading"


def _invert(zc, run, model, latent, cond, convention):
    return h.invert(zc, run, model, latent, cond, steps=STEPS, convention=convention)


def _model_eps(model, z: torch.Tensor, t: int, cond) -> torch.Tensor:
    """eps predicted for the VP sample ``z`` at training timestep ``t`` (what diffusers' ``unet(z, t)`` gives)."""
    ms = model.get_model_object("model_sampling")
    sigma = ms.sigmas[t].reshape(1).float()
    x = (z * (1.0 + sigma.double() ** 2).sqrt()).float()  # sigma space: ComfyUI feeds x / sqrt(1 + sigma^2) = z
    with torch.inference_mode():
        denoised = model.model.apply_model(x, sigma, c_crossattn=cond[0][0])
    return ((x - denoised) / sigma).double()


def _diffusers_inverse(model, x0: torch.Tensor, cond) -> torch.Tensor:
    """DDIMInverseScheduler (set_alpha_to_one=False, steps_offset=1, eps-prediction) in float64; returns the
    sigma-space x_T for the sigma-space clean latent ``x0`` (taken at ``alphas_cumprod[0]``, as diffusers does)."""
    ms = model.get_model_object("model_sampling")
    alphas = 1.0 / (1.0 + ms.sigmas.double() ** 2)  # alphas_cumprod
    ratio = 1000 // STEPS
    z = x0.double() * alphas[0].sqrt()  # the VP latent of the clean image
    a_prev = alphas[0]  # initial_alpha_cumprod
    for t in range(1, 1000, ratio):
        eps = _model_eps(model, z, t, cond)
        x0_pred = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        z = alphas[t].sqrt() * x0_pred + (1 - alphas[t]).sqrt() * eps
        a_prev = alphas[t]
    return z / a_prev.sqrt()


@pytest.fixture(scope="module")
def model():
    return tm.sd15(seed=5)


def test_next_is_diffusers_inverse_scheduler(zc, run, model):
    lat, cap = tm.latent(41), tm.conditioning(42)
    x_t, inversion, sigmas = _invert(zc, run, model, lat, cap, "next")
    ms = model.get_model_object("model_sampling")
    # the grid: ComfyUI's ddim_uniform levels, ending at the first training level instead of 0
    stock = h.ddim_sigmas(model, STEPS)
    assert torch.equal(sigmas[:-1], stock[:-1]) and float(stock[-1]) == 0.0
    assert float(sigmas[-1]) == pytest.approx(float(ms.sigma_min), rel=1e-7)
    assert torch.equal(inversion.sigmas, sigmas)

    x0 = model.model.process_latent_in(lat["samples"])
    expected = model.model.process_latent_out(_diffusers_inverse(model, x0, cap).float())
    scale = expected.abs().max()
    torch.testing.assert_close(x_t["samples"] / scale, expected / scale, rtol=0, atol=2e-5)


def test_next_equals_the_engine_and_differs_from_current(zc, run, model):
    from conftest import pack_module

    ddim_invert = pack_module("zerocon_core.method.inversion").ddim_invert
    inversion_sigmas = pack_module("zerocon_core.method.schedule").inversion_sigmas
    lat, cap = tm.latent(43), tm.conditioning(44)
    nxt, _, sigmas = _invert(zc, run, model, lat, cap, "next")
    cur, _, cur_sigmas = _invert(zc, run, model, lat, cap, "current")
    assert torch.equal(cur_sigmas, h.ddim_sigmas(model, STEPS))  # the default grid is unchanged

    def body(guider, x, sig, extra_args):
        den = zc.denoiser.ComfyDenoiser(guider.inner_model, extra_args.get("model_options", {}))
        with torch.inference_mode(False):
            return ddim_invert(den, x.clone(), sig.clone(), guider.conds["positive"], eval_at="next").latent

    results = {}

    def function(model_k, x, sig, extra_args=None, callback=None, disable=None):
        results["x"] = body(model_k.inner_model, x, sig, extra_args or {})
        return results["x"]

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cap, cap)
    guider.set_cfg(1.0)
    with torch.inference_mode():
        engine = guider.sample(
            torch.zeros_like(lat["samples"]),
            lat["samples"],
            comfy.samplers.KSAMPLER(function),
            inversion_sigmas(sigmas),
        )
    torch.testing.assert_close(nxt["samples"], engine, rtol=0, atol=1e-6 * float(engine.abs().max()))
    rel = float((nxt["samples"] - cur["samples"]).norm() / cur["samples"].norm())
    assert rel > 1e-3, f"next and current gave the same inversion (relative difference {rel:.2e})"


def test_guided_sampler_samples_down_the_next_grid(zc, run, model):
    """Unguided, the Guided Sampler's edit on a "next" inversion is the stock ddim sampler down the same grid."""
    lat, cap, edit = tm.latent(45), tm.conditioning(46), tm.conditioning(47)
    x_t, inversion, sigmas = _invert(zc, run, model, lat, cap, "next")
    edited, _ = h.guided(zc, run, model, inversion, edit)
    stock = h.sampler_custom(model, edit, cap, x_t, sigmas, cfg=5.0)
    scale = stock["samples"].abs().max()
    torch.testing.assert_close(edited["samples"] / scale, stock["samples"] / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", ["Next", "diffusers", ""])
def test_unknown_convention_is_a_clear_error(zc, run, model, bad):
    with pytest.raises(ValueError, match=r"ZeroCon DDIM Inversion: convention must be one of current, next; got "):
        _invert(zc, run, model, tm.latent(48), tm.conditioning(49), bad)


def test_convention_is_the_last_widget_and_optional(zc):
    """Saved workflows keep loading (widget values are positional) and API prompts without it still validate."""
    info = zc.sampling.ZeroConDDIMInversion.GET_NODE_INFO_V1()
    assert "convention" not in info["input"]["required"]
    spec = info["input"]["optional"]["convention"]
    assert spec[1]["options"] == ["current", "next"] and spec[1]["default"] == "current"
    assert info["input_order"]["optional"][-2:] == ["convention", "guidance"]  # guidance: a link, not a widget
    widgets = [n for n, s in info["input"]["optional"].items() if s[0] in ("COMBO", "INT", "FLOAT", "BOOLEAN")]
    assert widgets == ["convention"]  # the only optional widget: it comes after every required one
