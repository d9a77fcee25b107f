"""pipeline.invert_and_edit with branches="pix2pix-zero" and the "next" inversion convention is diffusers'
``StableDiffusionPix2PixZeroPipeline``: ``invert`` then ``__call__`` on the same tiny float32 UNet (no noise
regularisation, so no random draws; CFG 5 with the caption as negative, cross-attention guidance)."""

from __future__ import annotations

import copy

import pytest
import torch

from zerocon_core.diffusers_host.denoiser import TextCond
from zerocon_core.diffusers_host.pipeline import invert_and_edit
from zerocon_core.method.guidance import CrossAttentionGuidance
from zerocon_core.method.sampler import SamplerSettings

from .tiny import TEXT_DIM, TOKENS, tiny_cond, tiny_denoiser, tiny_latent
from .tiny_pix2pix_zero import pipeline_edit, pix2pix_zero_pipeline

STEPS = 10
CFG = 5.0
F32 = torch.float32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_invert_and_edit_is_the_diffusers_pipeline(weight):
    den, unet = tiny_denoiser("epsilon", seed=0, dtype=F32, keep_copy=True)
    unet.requires_grad_(False)
    caption = tiny_cond(1, dtype=F32)
    delta = 0.5 * torch.randn(1, TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(5), dtype=F32)
    z0 = tiny_latent(3, dtype=F32)

    def pipe_edit(w: float) -> torch.Tensor:
        pipe = pix2pix_zero_pipeline(copy.deepcopy(unet))
        inv = pipe.invert(
            prompt_embeds=caption.embeds,
            image=z0,  # 4 channels: taken as the latent itself
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            num_reg_steps=0,
            output_type="pt",
        )
        return pipeline_edit(pipe, inv.latents, caption.embeds, delta, STEPS, CFG, w)

    expect, unguided = pipe_edit(weight), pipe_edit(0.0)
    assert rel(expect, unguided) > 0.01  # the guidance moves the result

    z, inv, res = invert_and_edit(
        den,
        z0,
        caption,
        TextCond(caption.embeds + delta),
        steps=STEPS,
        guidance=(CrossAttentionGuidance(weight=weight),),
        settings=SamplerSettings(cfg=CFG, branches="pix2pix-zero"),
        regularization=None,
        eval_at="next",
        progress=False,
    )
    assert res.skipped == [] and len(res.losses) == STEPS
    assert rel(z, expect) < 3e-5, rel(z, expect)  # measured 6.9e-6 (w 0.1), 7.2e-6 (w 1); "current": 0.16


def test_invert_and_edit_takes_an_edit_run_or_the_old_keywords():
    from zerocon_core.diffusers_host.pipeline import EditRun

    den, _ = tiny_denoiser("epsilon", seed=0, dtype=F32, keep_copy=True)
    caption = tiny_cond(1, dtype=F32)
    edit = TextCond(caption.embeds + 0.3)
    z0 = tiny_latent(3, dtype=F32)
    guidance = (CrossAttentionGuidance(weight=0.1),)
    settings = SamplerSettings(cfg=CFG, step_mode="raw")
    seen = []
    common = dict(guidance=guidance, settings=settings)
    z_old, _, _ = invert_and_edit(
        den,
        z0,
        caption,
        edit,
        steps=3,
        eval_at="next",
        progress=False,
        step_callback=lambda *a: seen.append(a),
        **common,
    )
    assert [p for p, _, _ in seen] == ["inversion"] * 3 + ["sampling"] * 3
    run = EditRun(steps=3, eval_at="next", progress=False)
    z_new, _, _ = invert_and_edit(den, z0, caption, edit, run=run, **common)
    assert torch.equal(z_new, z_old)
    with pytest.raises(TypeError, match="unexpected keyword argument 'step'"):
        invert_and_edit(den, z0, caption, edit, step=3)


def test_pipeline_takes_sd_parts_or_the_old_components(monkeypatch):
    from zerocon_core.diffusers_host import pipeline as P
    from zerocon_core.diffusers_host.sd_models import SDParts

    made = []
    monkeypatch.setattr(P, "clip_encoder", lambda tok, enc, device=None: made.append((tok, enc)) or "encode")
    den, unet = tiny_denoiser("epsilon", seed=0, dtype=F32, keep_copy=True)
    vae, enc = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    old = P.ZeroConPipeline(unet, vae, enc, "tok", config, device="cpu")
    new = P.ZeroConPipeline(SDParts(unet, vae, enc, "tok", config))
    assert (old.vae, old.tokenizer, old.is_sdxl, old.scheduler_config) == (new.vae, new.tokenizer, False, config)
    assert made == [("tok", enc), ("tok", enc)]
    old.close()
    new.close()
    with pytest.raises(TypeError, match="missing required argument"):
        P.ZeroConPipeline(unet, vae)
