"""Helpers for the sampling tests: ComfyUI's stock nodes called as a graph would call them (under inference
mode) for reference results, and short-hands for running the pack's nodes."""

from __future__ import annotations

import torch


def ddim_sigmas(model, steps: int) -> torch.Tensor:
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    with torch.inference_mode():
        return BasicScheduler().get_sigmas(model, "ddim_uniform", steps, 1.0)[0]


def flip(sigmas: torch.Tensor) -> torch.Tensor:
    from comfy_extras.nodes_custom_sampler import FlipSigmas

    with torch.inference_mode():
        return FlipSigmas().get_sigmas(sigmas.clone())[0]


def sampler_custom(model, positive, negative, latent: dict, sigmas, cfg: float, sampler_name: str = "ddim") -> dict:
    """SamplerCustom with add_noise off (what a stock inversion / reconstruction graph uses)."""
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom

    with torch.inference_mode():
        sampler = KSamplerSelect().get_sampler(sampler_name)[0]
        out, _ = SamplerCustom().sample(model, False, 0, cfg, positive, negative, sampler, sigmas, latent)
    return out


def ksampler(model, positive, negative, latent: dict, steps: int = 3, cfg: float = 4.0, seed: int = 7) -> torch.Tensor:
    """The stock KSampler node path (nodes.common_ksampler): random noise, euler, normal schedule."""
    import nodes as comfy_nodes

    with torch.inference_mode():
        (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"].clone()


def stock_guider(model, positive, negative, cfg: float):
    """ComfyUI's CFGGuider on ``positive`` / ``negative`` at ``cfg``."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def stock_euler(model, positive, negative, cfg: float, noise, latent_image, sigmas) -> torch.Tensor:
    """Stock KSAMPLER "euler" through ``stock_guider`` from ``noise`` on ``latent_image`` (both tensors)."""
    import comfy.samplers

    with torch.inference_mode():
        guider = stock_guider(model, positive, negative, cfg)
        return guider.sample(noise, latent_image, comfy.samplers.sampler_object("euler"), sigmas)


def stock_euler_from_inversion(model, edit, source, cfg: float, inversion, sigmas) -> torch.Tensor:
    """Stock euler down from the inversion's x_T, given as the guider's noise on a zero latent (at sigma 1 ComfyUI's
    flow scaling keeps the noise only), cfg between the source (the negative) and the edit."""
    with torch.inference_mode():
        x_t = model.model.latent_format.process_in(inversion.latent)
        return stock_euler(model, edit, source, cfg, x_t, torch.zeros_like(x_t), sigmas)


def stock_euler_last(model, cond, latent: dict, sigmas) -> torch.Tensor:
    """Stock ``sample_euler``'s own last result on ``sigmas`` (zero noise, cfg 1 on ``cond``), before ComfyUI's
    scaling out (which divides by 1 - sigma_last)."""
    import comfy.samplers
    from comfy.k_diffusion.sampling import sample_euler

    captured = []

    def euler(m, x, s, **kw):
        out = sample_euler(m, x, s, **kw)
        captured.append(out.clone())
        return out

    zeros = torch.zeros_like(latent["samples"])
    with torch.inference_mode():
        stock_guider(model, cond, cond, 1.0).sample(zeros, latent["samples"], comfy.samplers.KSAMPLER(euler), sigmas)
    return captured[-1]


def inversion_latent(zc, model, cond, lat: dict, up) -> torch.Tensor:
    """Our inversion KSAMPLER function on the grid ``up`` (through ``ZeroConKSampler``, as the node runs it)."""
    guider = stock_guider(model, cond, cond, 1.0)
    sampler = zc.sampling.ZeroConKSampler(zc.sampling.inversion_function, extra_options={})
    with torch.inference_mode():
        return guider.sample(torch.zeros_like(lat["samples"]), lat["samples"], sampler, up)


def assert_inversion_equals_stock_euler_short_of_1(zc, model, cond, lat: dict, up) -> None:
    """Our inversion equals stock KSAMPLER "euler" on the flipped grid ``up`` short of its last level (sigma 1,
    where ComfyUI's flow scaling divides by 1 - sigma_last, which is undone here), within 1e-5."""
    fmt = model.model.latent_format
    ours_short = inversion_latent(zc, model, cond, lat, up[:-1])
    stock = stock_euler(model, cond, cond, 1.0, torch.zeros_like(lat["samples"]), lat["samples"], up[:-1])
    torch.testing.assert_close(
        fmt.process_in(ours_short), fmt.process_in(stock) * (1 - float(up[-2])), rtol=0, atol=1e-5
    )


def sample_custom_advanced(guider, sampler, sigmas, latent: dict):
    """The stock SamplerCustomAdvanced node with DisableNoise, under inference mode: (output, denoised output)."""
    from comfy_extras.nodes_custom_sampler import DisableNoise, SamplerCustomAdvanced

    with torch.inference_mode():
        return SamplerCustomAdvanced().sample(DisableNoise().get_noise()[0], guider, sampler, sigmas, latent)


# -- the pack's nodes ---------------------------------------------------------------------------------

STEPS = 4


def models():
    """name -> (builder, needs pooled_output)."""
    import tiny_models as tm

    return {"sd15": (tm.sd15, False), "sd2v": (tm.sd2v, False), "sdxl": (tm.sdxl, True)}


def inversion_inputs(model, cond, steps=STEPS, regularize=False, **over) -> dict:
    """The DDIM Inversion node's inputs but the latent (cfg 1, the regulariser's defaults, seed 0)."""
    kw = dict(
        model=model,
        conditioning=cond,
        steps=steps,
        cfg=1.0,
        regularize=regularize,
        lambda_ac=20.0,
        lambda_kl=20.0,
        reg_outer=1,
        reg_rolls=2,
        seed=0,
    )
    kw.update(over)
    return kw


def invert(zc, run, model, latent, cond, steps=STEPS, regularize=False, **over):
    return run(
        zc.sampling.ZeroConDDIMInversion, latent=latent, **inversion_inputs(model, cond, steps, regularize, **over)
    )


def guided(zc, run, model, inversion, edited, **over):
    kw = dict(
        model=model,
        inversion=inversion,
        edited=edited,
        cfg=5.0,
        step_mode="raw",
        step_size=0.02,
        branches="edit",
        seed=0,
    )
    kw.update(over)
    return run(zc.sampling.ZeroConGuidedSampler, **kw)[:2]  # (edit, reconstruction); diagnostics: guided_outputs


def resampled_edit(zc, run, model, with_guidance: bool = True, steps: int = STEPS) -> torch.Tensor:
    """The Guided Sampler's edit latent (reference "resampled") of tiny latent 30, caption conditioning 31 -> edit
    32, inverted in ``steps`` steps; with the default guidance chain, or none (``with_guidance=False``)."""
    import tiny_models as tm

    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    g = guidance(zc, run) if with_guidance else None
    _, inversion, _ = invert(zc, run, model, lat, cap, steps=steps, guidance=g)
    out, _ = guided(zc, run, model, inversion, edit, guidance=g, reference="resampled")
    return out["samples"]


def guided_outputs(zc, run, model, inversion, edited, **over):
    """All the Guided Sampler's outputs: (edit, reconstruction, diagnostics IMAGE, summary STRING)."""
    kw = dict(model=model, inversion=inversion, edited=edited, cfg=5.0, branches="edit", seed=0)
    kw.update(over)
    return run(zc.sampling.ZeroConGuidedSampler, **kw)


def ddim_sampler_node(zc, run, step_mode: str = "raw", branches: str = "edit"):
    """The Guided DDIM Sampler node's SAMPLER (step size 0.02, seed 0)."""
    (sampler,) = run(
        zc.sampling.ZeroConGuidedDDIMSampler, step_mode=step_mode, step_size=0.02, branches=branches, seed=0
    )
    return sampler


def guidance(zc, run, xa=0.1, nce=0.05, patches=16, seed=0):
    """Cross-attention + PatchNCE guidance chain (through the nodes); ``seed``: PatchNCE's locations."""
    (g,) = run(zc.guidance.ZeroConCrossAttentionGuidance, weight=xa, layers="all", start=0.0, end=1.0)
    (g,) = run(
        zc.guidance.ZeroConPatchNCEGuidance,
        weight=nce,
        layers="up",
        patches=patches,
        tau=0.07,
        patch_sizes="1,2",
        start=0.0,
        end=1.0,
        previous=g,
        location_seed=seed,
    )
    return g
