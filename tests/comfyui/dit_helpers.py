"""Helpers for the DiT capture and family tests: run a body inside ComfyUI's CFGGuider.sample as a KSAMPLER
function (where ComfyDenoiser sees what a node sees), and the two guided checks every DiT family repeats: one
gradient step on a term, and a guided run through ``guided_ddim_sample``."""

from __future__ import annotations

import dataclasses

import comfy.model_management
import comfy.samplers
import pytest
import tiny_models as tm
import torch
from conftest import pack_module

core_den = pack_module("zerocon_core.method.denoiser")
guidance = pack_module("zerocon_core.method.guidance")
sampler = pack_module("zerocon_core.method.sampler")


def _sigmas(model, steps=3):
    with torch.inference_mode():
        return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).float()


def _inside_sampler(model, conds: dict, body, latent=None, sigmas=None, noise_seed=None):
    """Run ``body(guider, x, sigmas, extra_args)`` as a KSAMPLER function inside CFGGuider.sample (zero noise
    unless ``noise_seed``)."""
    results = {}

    def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        results["value"] = body(model_k.inner_model, x, sigmas, extra_args)
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds(conds)
    latent = tm.flow_latent(70) if latent is None else latent
    sigmas = _sigmas(model) if sigmas is None else sigmas
    noise = torch.zeros_like(latent["samples"])
    if noise_seed is not None:
        noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(noise_seed))
    with torch.inference_mode():
        guider.sample(noise, latent["samples"], comfy.samplers.KSAMPLER(function), sigmas)
    return results["value"]


def _den(zc, guider, extra_args):
    return zc.denoiser.ComfyDenoiser(guider.inner_model, extra_args["model_options"])


def _recording_patch(store, key):
    """A DiT block patch that records the block's arguments, and its image output as ``"out"``, in ``store[key]``."""

    def patch(args, extra):
        store[key] = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        out = extra["original_block"](args)
        store[key]["out"] = out["img"].detach().clone()
        return out

    return patch


def first_blocks_captured(zc, model, cond, features=None, latent=None):
    """(prediction, records) of one prediction on ``cond`` at the first sigma with the text maps of the first
    double and single blocks captured, and as features the two blocks' image outputs (or ``features(layers)``);
    ``records["double"]`` / ``records["single"]``: those blocks' arguments and outputs (``_recording_patch``);
    ``latent``: the LATENT to predict on (default ``_inside_sampler``'s 16-channel one)."""
    seen = {}
    model.set_model_patch_replace(_recording_patch(seen, "double"), "dit", "double_block", 0)
    model.set_model_patch_replace(_recording_patch(seen, "single"), "dit", "single_block", 0)

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        names = frozenset({"double.0.img2txt", "single.0.img2txt"})
        wanted = frozenset({"double.0.img", "single.0.img"}) if features is None else features(den.layers())
        req = core_den.CaptureRequest(probs=names, features=wanted)
        return den.predict(x, sigmas[0], [guider.conds["positive"]], req)[0]

    return _inside_sampler(model, {"positive": cond}, body, latent=latent), seen


def each_term(num_patches: int):
    """Parametrize a test over ``term``: cross-attention guidance, and PatchNCE on ``num_patches`` patches."""
    terms = [
        guidance.CrossAttentionGuidance(weight=1.0),
        guidance.PatchNCEGuidance(weight=1.0, num_patches=num_patches),
    ]
    return pytest.mark.parametrize("term", terms, ids=["xattn", "patchnce"])


def assert_one_step_lowers_the_loss(zc, model, term, conds: dict, latent=None, step_size=1e-2, noise_seed=None):
    """One normalized guidance step of ``term`` at ``sigmas[1]`` is finite and lowers the (positive) loss: the
    source (``conds["positive"]``) gives the reference, the edit (``conds["negative"]``) the prediction; from the
    latent noised with ``noise_seed`` (None: zero noise)."""
    before, after, finite = _one_step_losses(zc, model, term, conds, latent, step_size, noise_seed)
    assert finite and before > 0
    assert after < before, (before, after)


def _one_step_losses(zc, model, term, conds: dict, latent, step_size, noise_seed=None):
    """(loss before, loss after, finite) of that step."""

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        src, edit = guider.conds["positive"], guider.conds["negative"]
        req = term.request(den.layers())
        with torch.inference_mode(False), torch.no_grad():
            x, s = x.clone(), sigmas[1].clone()
            (ref,) = den.predict(x, s, [src], req)

            def loss(xx):
                (p,) = den.predict(xx, s, [edit], req)
                ctx = guidance.StepContext(0, 10, s, xx, p.eps, p, ref, torch.Generator().manual_seed(0))
                return float(term.loss(ctx, req))

            step = sampler.GuidedStep(den, 0, 10, s, None, [(term, req)], [ref, ref], src, edit, torch.Generator())
            with den.autograd_session():
                outcome = sampler._guidance_step(
                    x, step, sampler.SamplerSettings(step_mode="normalized", step_size=step_size)
                )
            (x_new,) = outcome.latents
            return loss(x), loss(x_new), outcome.finite

    return _inside_sampler(model, conds, body, latent=latent, noise_seed=noise_seed)


def guided_run(zc, model, term, pos, neg, lat, sigmas=None):
    """The latent of ``guided_ddim_sample`` with ``term`` and an 8-patch PatchNCE term (cfg 1, normalized steps,
    resampled reference), from seed-13 noise, source ``pos`` and edit ``neg``."""
    term2 = guidance.PatchNCEGuidance(weight=1.0, num_patches=8)

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        with torch.inference_mode(False):
            out = sampler.guided_ddim_sample(
                den,
                x.clone(),
                sigmas.clone(),
                source_cond=guider.conds["positive"],
                edit_cond=guider.conds["negative"],
                guidance=(term, term2),
                settings=sampler.SamplerSettings(cfg=1.0, step_mode="normalized", reference="resampled"),
            )
        return out.latent

    return _inside_sampler(model, {"positive": pos, "negative": neg}, body, latent=lat, sigmas=sigmas, noise_seed=13)


@dataclasses.dataclass(frozen=True)
class WatchingTerm(guidance.CrossAttentionGuidance):
    """Cross-attention guidance that notes in ``seen``, at each loss, whether a weight of ``model`` required grad,
    and raises ``error`` at step ``stop_at``."""

    model: object = None
    stop_at: int = -1
    error: type = comfy.model_management.InterruptProcessingException
    seen: list = dataclasses.field(default_factory=list, compare=False)

    def loss(self, ctx, request):
        self.seen.append(any(p.requires_grad for p in self.model.parameters()))
        if ctx.step == self.stop_at:
            raise self.error()
        return super().loss(ctx, request)
