"""ComfyDenoiser inside a real ComfyUI sampler: layer table, captures, gradients, per-call patches only."""

from __future__ import annotations

import comfy.samplers
import pytest
import sampling_helpers as h
import tiny_models as tm
import torch


def _inside_sampler(model, conds: dict, body, latent=None, sigmas=None):
    """Run ``body(denoiser, guider, x, sigmas, extra_args)`` as a KSAMPLER function inside CFGGuider.sample."""
    results = {}

    def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model_k.inner_model
        results["value"] = body(guider, x, sigmas, extra_args)
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds(conds)
    latent = tm.latent(70) if latent is None else latent
    sigmas = h.ddim_sigmas(model, 3) if sigmas is None else sigmas
    with torch.inference_mode():
        guider.sample(torch.zeros_like(latent["samples"]), latent["samples"], comfy.samplers.KSAMPLER(function), sigmas)
    return results["value"]


def test_layer_table_sd15(zc, sd15_model):
    den = zc.denoiser.ComfyDenoiser(sd15_model.model)
    layers = den.layers()
    names = [info.name for info in layers]
    # tiny SD1.5: attention in input 1 (level 0), input 3 (level 1), middle, output 0-1 (level 1), output 2-3 (level 0)
    assert names == [
        "input.1.0.attn1",
        "input.1.0.attn2",
        "input.3.0.attn1",
        "input.3.0.attn2",
        "middle.0.0.attn1",
        "middle.0.0.attn2",
        "output.0.0.attn1",
        "output.0.0.attn2",
        "output.1.0.attn1",
        "output.1.0.attn2",
        "output.2.0.attn1",
        "output.2.0.attn2",
        "output.3.0.attn1",
        "output.3.0.attn2",
    ]
    by_name = {i.name: i for i in layers}
    assert (by_name["input.1.0.attn2"].block, by_name["input.1.0.attn2"].level, by_name["input.1.0.attn2"].kind) == (
        "down",
        0,
        "cross",
    )
    assert (by_name["middle.0.0.attn1"].block, by_name["middle.0.0.attn1"].level) == ("mid", 1)
    assert (by_name["output.1.0.attn1"].block, by_name["output.1.0.attn1"].level, by_name["output.1.0.attn1"].kind) == (
        "up",
        1,
        "self",
    )
    assert by_name["output.3.0.attn2"].level == 0
    assert den.prediction_type == "eps"
    ms = sd15_model.get_model_object("model_sampling")
    assert den.sigma_table.dtype == torch.float64 and torch.equal(den.sigma_table, ms.sigmas.double())


def test_layer_table_sdxl_depth(zc, sdxl_model):
    names = [i.name for i in zc.denoiser.ComfyDenoiser(sdxl_model.model).layers() if i.kind == "cross"]
    assert names[:2] == ["input.3.0.attn2", "input.3.1.attn2"]  # depth 2: block_index 0 and 1
    assert "middle.0.1.attn2" in names


def test_captures_shapes_sums_and_token_fold(zc, sd15_model):
    cap, neg = tm.conditioning(71), tm.conditioning(72, tokens=154)  # different lengths: ComfyUI repeats to 154
    CR = zc.denoiser.CaptureRequest

    def body(guider, x, sigmas, extra_args):
        den = zc.denoiser.ComfyDenoiser(guider.inner_model, extra_args["model_options"])
        layers = den.layers()
        req = CR(
            probs=frozenset(i.name for i in layers if i.kind == "cross"),
            features=frozenset(i.name for i in layers if i.kind == "self" and i.block == "up"),
        )
        plain = den.predict(x, sigmas[0], [guider.conds["positive"], guider.conds["negative"]])
        captured = den.predict(x, sigmas[0], [guider.conds["positive"], guider.conds["negative"]], req)
        return plain, captured, req

    plain, captured, req = _inside_sampler(sd15_model, {"positive": cap, "negative": neg}, body)
    for p, c in zip(plain, captured):
        torch.testing.assert_close(c.eps, p.eps, rtol=1e-4, atol=1e-4)  # our fp32 attention = ComfyUI's
    pos, negp = captured
    assert set(pos.probs) == set(req.probs) and set(pos.features) == set(req.features)
    m = pos.probs["input.1.0.attn2"]
    assert m.shape == (1, 4, 256, 77) and m.dtype == torch.float32
    torch.testing.assert_close(m.sum(-1), torch.ones(1, 4, 256))
    assert negp.probs["input.1.0.attn2"].shape == (1, 4, 256, 154)
    assert pos.probs["input.3.0.attn2"].shape == (1, 4, 64, 77)
    assert pos.features["output.3.0.attn1"].shape == (1, 32, 16, 16)
    assert pos.features["output.0.0.attn1"].shape == (1, 64, 8, 8)


def test_token_fold_is_exact(zc, sd15_model):
    """A 77-token cond batched with a 154-token one is repeated to 154 by ComfyUI; folding gives its own maps."""
    cap, long = tm.conditioning(73), tm.conditioning(74, tokens=154)
    CR = zc.denoiser.CaptureRequest

    def body(guider, x, sigmas, extra_args):
        den = zc.denoiser.ComfyDenoiser(guider.inner_model, extra_args["model_options"])
        req = CR(probs=frozenset({"output.3.0.attn2"}))
        (alone,) = den.predict(x, sigmas[0], [guider.conds["positive"]], req)
        together = den.predict(x, sigmas[0], [guider.conds["positive"], guider.conds["negative"]], req)
        return alone, together[0]

    alone, together = _inside_sampler(sd15_model, {"positive": cap, "negative": long}, body)
    assert together.probs["output.3.0.attn2"].shape == (1, 4, 256, 77)
    torch.testing.assert_close(
        together.probs["output.3.0.attn2"], alone.probs["output.3.0.attn2"], rtol=1e-5, atol=1e-6
    )


def test_gradient_reaches_the_latent_through_inference_weights(zc, sd15_model):
    CR = zc.denoiser.CaptureRequest

    def body(guider, x, sigmas, extra_args):
        den = zc.denoiser.ComfyDenoiser(guider.inner_model, extra_args["model_options"])
        req = CR(probs=frozenset({"input.1.0.attn2"}), features=frozenset({"output.3.0.attn1"}))
        try:  # without the session ComfyUI's inference-tensor weights refuse autograd
            with torch.inference_mode(False), torch.enable_grad():
                xg = x.clone().requires_grad_(True)
                (p,) = den.predict(xg, sigmas[0].clone(), [guider.conds["positive"]], req)
                torch.autograd.grad(p.probs["input.1.0.attn2"].square().sum(), xg)
            failed = None
        except RuntimeError as exc:
            failed = str(exc)
        seen = {}
        real = den.model_options
        with den.autograd_session(), torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            s = sigmas[0].clone()
            (p,) = den.predict(xg, s, [guider.conds["positive"]], req)
            loss = (
                p.probs["input.1.0.attn2"].square().sum()
                + p.features["output.3.0.attn1"].square().mean()
                + p.eps.square().mean()
            )
            (g,) = torch.autograd.grad(loss, xg)
            seen["override"] = (
                "optimized_attention_override" in den._options(None, None, grad=True)["transformer_options"]
            )
        seen["untouched"] = "optimized_attention_override" not in real.get("transformer_options", {})
        return failed, g, seen

    failed, g, seen = _inside_sampler(sd15_model, {"positive": tm.conditioning(75)}, body)
    assert failed is not None and "nference" in failed
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert seen == {"override": True, "untouched": True}


def test_differentiable_attention_override_routes_kernels(zc):
    from comfy.ldm.modules import attention

    calls = []

    def flash_like(q, k, v, heads, **kw):  # a kernel without a backward
        calls.append("flash")
        return None

    flash_like.__name__ = "attention_flash"
    override = zc.denoiser._differentiable_attention_override(None, set())
    q = k = v = torch.randn(1, 5, 8)
    out = override(flash_like, q, k, v, 2)
    assert calls == [] and out.shape == (1, 5, 8)
    torch.testing.assert_close(out, attention.attention_basic(q, k, v, 2))
    basic = getattr(attention.attention_basic, "__wrapped__", attention.attention_basic)
    handed = []

    def previous(func, *a, **kw):  # an override that runs the kernel it is handed
        handed.append(func.__name__)
        return func(*a, **kw)

    chained = zc.denoiser._differentiable_attention_override(previous, set())
    torch.testing.assert_close(chained(flash_like, q, k, v, 2), attention.attention_basic(q, k, v, 2))
    chained(basic, q, k, v, 2)
    assert handed == ["attention_pytorch", "attention_basic"] and calls == []


def test_existing_attn2_replace_patch_keeps_working(zc, sd15_model):
    """A replace patch the user already has (IPAdapter-style) still produces the output; we only read probs."""
    seen = []

    def user_patch(q, k, v, extra_options):
        seen.append(extra_options["block"])
        return torch.zeros_like(q)

    patched = sd15_model.clone()
    patched.set_model_attn2_replace(user_patch, "output", 3, 0)
    CR = zc.denoiser.CaptureRequest

    def body(guider, x, sigmas, extra_args):
        den = zc.denoiser.ComfyDenoiser(guider.inner_model, extra_args["model_options"])
        (a,) = den.predict(x, sigmas[0], [guider.conds["positive"]])
        n = len(seen)
        (b,) = den.predict(x, sigmas[0], [guider.conds["positive"]], CR(probs=frozenset({"output.3.0.attn2"})))
        return a, b, n

    a, b, n = _inside_sampler(patched, {"positive": tm.conditioning(76)}, body)
    assert n == 1 and len(seen) == 2  # the user's patch ran in both calls
    torch.testing.assert_close(a.eps, b.eps)
    assert b.probs["output.3.0.attn2"].shape == (1, 4, 256, 77)


def test_families(zc, sd15_model, sd2v_model, sdxl_model):
    fam = zc.families.detect_family
    assert (fam(sd15_model).name, fam(sd15_model).prediction_type) == ("SD1.x", "eps")
    assert (fam(sd2v_model).name, fam(sd2v_model).prediction_type) == ("SD2.x", "v")
    assert (fam(sdxl_model).name, fam(sdxl_model).prediction_type) == ("SDXL", "eps")
    assert fam(sd15_model).default_cross_attention_weight == pytest.approx(0.1)
    assert fam(sd2v_model).default_cross_attention_weight == pytest.approx(0.01)
