"""Low precision: the UNet in fp16 and bf16 (ComfyUI's ``--fp16-unet`` / ``--bf16-unet``), and fp16 / bf16
weights cast per layer to fp32 (``comfy.ops.manual_cast``, what ComfyUI does with fp16 weights on a CPU).

The tiny SD1.5 model is built for each precision as ComfyUI's checkpoint loader builds it
(``tiny_models.sd15_as_loaded``), with the same weights as the fp32 model (rounded to the dtype). For each:
inversion (regularised, recording for replay) and the guided sampler give finite output; the guidance was
applied at >= 95 % of the steps (the engine's ``SampleResult.skipped``); the guidance's effect (guided minus
unguided edit) points the way fp32's does; the result agrees with the fp32 run within the tolerance below.

Measured (6 steps, CFG 5, cross-attention 0.1 + PatchNCE 0.05; relative L2 distance to the fp32 run, CPU,
torch 2.14):

| precision | inversion | guided edit | unguided edit (same precision) | cosine of the guidance effect |
|---|---|---|---|---|
| fp16 | 0.0066 | 0.026 | 0.023 | 0.997 |
| bf16 | 0.048 | 0.18 | 0.18 | 0.87 |
| fp16 weights, fp32 compute | 0.0045 | 0.017 | 0.016 | 0.999 |
| bf16 weights, fp32 compute | 0.032 | 0.12 | 0.11 | 0.95 |

So the guided edit is as far from fp32 as a plain DDIM edit at the same precision (within 1.25 x): the
guidance adds no error of its own. bf16's 8-bit mantissa moves this random tiny model far (most of it from
rounding the weights: the manual-cast row computes in fp32); the tolerances are about 1.5 x the measured values.
"""

from __future__ import annotations

import pytest
import robust_helpers as rh
import sampling_helpers as h
import tiny_models as tm
import torch

STEPS = 6
# name: (weight dtype, compute dtype (None: the weight dtype), max relative L2 to fp32 of the guided edit,
#        min cosine between the guidance effects)
PRECISIONS = {
    "fp16": (torch.float16, None, 0.04, 0.98),
    "bf16": (torch.bfloat16, None, 0.27, 0.75),
    "fp16-weights-fp32-compute": (torch.float16, torch.float32, 0.03, 0.99),
    "bf16-weights-fp32-compute": (torch.bfloat16, torch.float32, 0.18, 0.85),
}
INVERSION_TOLERANCE = {torch.float16: 0.01, torch.bfloat16: 0.075}


def _edit(zc, run, model, guidance):
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    x_t, inversion, _ = h.invert(zc, run, model, lat, cap, steps=STEPS, regularize=True, guidance=guidance)
    guided, _ = h.guided(zc, run, model, inversion, edit, guidance=guidance)
    plain, _ = h.guided(zc, run, model, inversion, edit)
    return x_t["samples"], guided["samples"], plain["samples"]


@pytest.fixture(scope="module")
def fp32_run():
    import types

    from conftest import pack_module, run_node

    zc = types.SimpleNamespace(
        sampling=pack_module("nodes.classes.sampling_nodes"), guidance=pack_module("nodes.classes.guidance_nodes")
    )
    return _edit(zc, run_node, tm.sd15_as_loaded(torch.float32), h.guidance(zc, run_node))


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_low_precision_guided_edit_agrees_with_fp32(zc, run, monkeypatch, fp32_run, name):
    weight_dtype, compute_dtype, tolerance, min_cosine = PRECISIONS[name]
    model = tm.sd15_as_loaded(weight_dtype, compute_dtype)
    assert model.model.get_dtype() == weight_dtype and model.model.manual_cast_dtype == compute_dtype
    assert next(model.model.diffusion_model.parameters()).dtype == weight_dtype
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    stock_before = h.ksampler(model, edit, cap, lat)
    before = rh.snapshot(model)
    results = rh.spy_engine(monkeypatch, zc)

    x_t, guided, plain = _edit(zc, run, model, h.guidance(zc, run))

    guided_result = results[0]
    assert len(results) == 2 and not any(results[1].losses)  # the second run is the unguided one
    assert torch.isfinite(x_t).all() and torch.isfinite(guided).all() and torch.isfinite(plain).all()
    applied = STEPS - len(guided_result.skipped)
    assert applied >= 0.95 * STEPS, f"guidance skipped at steps {guided_result.skipped}"
    assert all(all(torch.isfinite(torch.tensor(v)) for v in step.values()) for step in guided_result.losses)
    assert guided_result.reference_mode == "inverted" and guided_result.replayed  # the fp16 record replays

    x_t32, guided32, plain32 = fp32_run
    assert rh.rel(x_t, x_t32) < INVERSION_TOLERANCE[weight_dtype]
    assert rh.rel(guided, guided32) < tolerance
    # the guidance adds no error of its own: as far from fp32 as the unguided edit at this precision
    assert rh.rel(guided, guided32) < 1.25 * rh.rel(plain, plain32) + 1e-3
    # and it was applied, the way fp32 applies it (a skipped or vanished gradient gives cosine 0)
    effect, effect32 = guided - plain, guided32 - plain32
    assert effect.norm() > 0.5 * effect32.norm()
    assert rh.cosine(effect, effect32) > min_cosine

    rh.assert_untouched(model, before, stock_before, edit, cap, lat)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_captures_reach_the_losses_in_float32(zc, run, dtype):
    """The capture patches take the half-precision activations of an fp16 / bf16 UNet and hand float32
    probabilities and features to the losses."""
    model = tm.sd15_as_loaded(dtype)
    Request = zc.denoiser.CaptureRequest
    seen = {}
    real = zc.denoiser._Recorder

    class Recorder(real):
        def add_probs(self, name, probs, extra_options):
            seen.setdefault("probs", set()).add(probs.dtype)
            super().add_probs(name, probs, extra_options)

        def add_features(self, name, feat, extra_options):
            seen.setdefault("features", set()).add(feat.dtype)
            super().add_features(name, feat, extra_options)

    import comfy.samplers

    zc.denoiser._Recorder = Recorder
    try:
        guider = comfy.samplers.CFGGuider(model)
        cond = tm.conditioning(1)
        guider.set_conds(cond, cond)
        captured = {}

        def sampler_function(m, x, sigmas, extra_args=None, callback=None, disable=None):
            denoiser = zc.denoiser.ComfyDenoiser(m.inner_model.inner_model, extra_args.get("model_options", {}))
            names = [info.name for info in denoiser.layers()]
            request = Request(
                probs=frozenset(n for n in names if n.endswith("attn2")),
                features=frozenset(n for n in names if n.endswith("attn1")),
            )
            with torch.inference_mode(False), torch.no_grad():
                (pred,) = denoiser.predict(x.clone(), sigmas[0].clone(), [m.inner_model.conds["positive"]], request)
            captured["pred"] = pred
            return x

        sampler = comfy.samplers.KSAMPLER(sampler_function)
        sigmas = h.ddim_sigmas(model, 2)
        with torch.inference_mode():
            lat = tm.latent(3)["samples"]
            guider.sample(torch.zeros_like(lat), lat, sampler, sigmas, seed=0)
    finally:
        zc.denoiser._Recorder = real
    assert seen == {"probs": {torch.float32}, "features": {torch.float32}}
    pred = captured["pred"]
    assert pred.eps.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in (*pred.probs.values(), *pred.features.values()))
