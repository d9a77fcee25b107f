"""The DiffuseIT nodes inside real ComfyUI: guidance terms built from a MODEL, a VAE and a DINO link, the
DiffuseIT sampler end to end (gradients through ComfyUI's inference-tensor VAE and DINO), error paths."""

from __future__ import annotations

import pytest
import tiny_clip
import tiny_models as tm
import torch
from conftest import core_helper, pack_fixture, pack_module

SIZE = 64  # pixels: latent 8 x 8 with the tiny 8x VAE


dn = pack_fixture("nodes.classes.diffuseit_nodes")
dino_nodes = pack_fixture("nodes.classes.dino_nodes")


@pytest.fixture
def dino(dino_nodes):
    """A tiny DINO-layout ViT built under inference mode (as the loader does), wrapped like a ZEROCON_DINO link."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(**core_helper("tiny_vision").tiny_dino_config())
    with torch.inference_mode():
        torch.manual_seed(0)
        vit = ViTModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)
    cpu = torch.device("cpu")
    return dino_nodes.ZeroConModel(vit, dino_nodes.patcher_for(vit, cpu, cpu), "tiny")


@pytest.fixture
def vae():
    return tiny_clip.vae(0)


def image(seed: int, batch: int = 1, h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return torch.rand(batch, h, w, 3, generator=gen)


def encode(vae, img) -> dict:
    with torch.inference_mode():
        return {"samples": vae.encode(img)}


def _dino_term(run, node, links: tuple, inputs: dict, over: dict):
    """The GUIDANCE of a DINO term node on (model, vae, dino) = ``links``, weight 1, DINO at 32 px, the whole run;
    ``inputs``: the node's own, ``over``: any input replaced."""
    model, vae, dino = links
    kw = dict(model=model, vae=vae, dino=dino, weight=1.0, dino_size=32, start=0.0, end=1.0, **inputs)
    kw.update(over)
    return run(node, **kw)[0]


def structure(dn, run, model, vae, dino, img, **over):
    own = dict(
        image=img,
        lambda_ssim=1000.0,
        lambda_contrastive=200.0,
        lambda_semantic=100.0,
        lambda_range=200.0,
        noise_blend=False,
    )
    return _dino_term(run, dn.ZeroConDinoStructureGuidance, (model, vae, dino), own, over)


def style(dn, run, model, vae, dino, ref, **over):
    own = dict(reference=ref, lambda_cls=2000.0, lambda_pixel=3000.0)
    return _dino_term(run, dn.ZeroConDinoStyleGuidance, (model, vae, dino), own, over)


def sampler_inputs(model, latent, guidance, **over) -> dict:
    """The DiffuseIT sampler's inputs these tests use (SD1.5 conditionings), with ``over`` replacing any."""
    kw = dict(
        model=model,
        positive=tm.conditioning(1),
        negative=tm.conditioning(2),
        latent=latent,
        guidance=guidance,
        steps=6,
        cfg=3.0,
        strength=0.5,
        resample=2,
        seed=3,
        step_mode="raw",
        step_size=0.02,
    )
    kw.update(over)
    return kw


def sample(dn, run, model, latent, guidance, **over):
    return run(dn.ZeroConDiffuseITSampler, **sampler_inputs(model, latent, guidance, **over))[0]


def test_schemas_have_tooltips(dn):
    for node in dn.NODES:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("ZeroCon")
        for inp in schema.inputs:
            assert getattr(inp, "tooltip", None), f"{schema.node_id}.{inp.id} has no tooltip"


def test_guidance_nodes_build_composable_terms(zc, dn, run, sd15_model, vae, dino):
    core = pack_module("zerocon_core.diffuseit.guidance")
    prev = run(zc.guidance.ZeroConCrossAttentionGuidance, weight=-1.0, layers="all", start=0.0, end=1.0)[0]
    terms = structure(dn, run, sd15_model, vae, dino, image(1), previous=prev)
    names = [type(t).__name__ for t in terms]
    assert names == ["CrossAttentionGuidance", "DinoStructureGuidance", "SemanticDivergenceGuidance", "RangeGuidance"]
    st = terms[1]
    assert isinstance(st, core.DinoStructureGuidance) and st.lambda_ssim == 1000.0 and st.lambda_cont == 200.0
    assert not st.source.is_inference() and st.source.shape == (1, 3, SIZE, SIZE)
    only = structure(dn, run, sd15_model, vae, dino, image(1), lambda_semantic=0.0, lambda_range=0.0)
    assert [type(t).__name__ for t in only] == ["DinoStructureGuidance"]
    both = style(dn, run, sd15_model, vae, dino, image(2, h=40, w=56), previous=only)
    assert [type(t).__name__ for t in both] == ["DinoStructureGuidance", "DinoStyleGuidance"]


def test_vae_of_another_family_is_a_clear_error(dn, run, sd15_model, dino):
    import types

    wide = types.SimpleNamespace(first_stage_model=torch.nn.Identity(), latent_channels=16, latent_dim=2, patcher=None)
    with pytest.raises(ValueError, match="16-channel image latents but the MODEL is SD1.x"):
        structure(dn, run, sd15_model, wide, dino, image(1))


def test_unsupported_model_is_a_clear_error(zc, dn, run, vae, dino):
    with pytest.raises(zc.families.UnsupportedModelError, match="supports"):
        style(dn, run, tm.flux_fill(), vae, dino, image(1))


def test_diffuseit_sampler_end_to_end(dn, run, sd15_model, vae, dino):
    src = image(4)
    lat = encode(vae, src)
    modules = (vae.first_stage_model, dino.model)
    before = [[(id(p), p.is_inference(), p.requires_grad, p.data_ptr()) for p in m.parameters()] for m in modules]
    guidance = style(
        dn, run, sd15_model, vae, dino, image(5, h=48, w=48), previous=structure(dn, run, sd15_model, vae, dino, src)
    )
    plain = sample(dn, run, sd15_model, lat, structure(dn, run, sd15_model, vae, dino, src, weight=0.0))
    out = sample(dn, run, sd15_model, lat, guidance)
    again = sample(dn, run, sd15_model, lat, guidance)
    assert out["samples"].shape == lat["samples"].shape and torch.isfinite(out["samples"]).all()
    assert torch.equal(out["samples"], again["samples"])  # seeded
    diff = (out["samples"] - plain["samples"]).abs().max()
    assert diff > 1e-4 * plain["samples"].abs().max(), "DINO guidance did not move the latent"
    # nothing left behind: the VAE's and DINO's weights are the same inference tensors, flags, storage; no grads
    after = [[(id(p), p.is_inference(), p.requires_grad, p.data_ptr()) for p in m.parameters()] for m in modules]
    assert after == before
    assert all(p.is_inference() and p.grad is None for m in modules for p in m.parameters())


def test_sampler_auto_strength_and_no_resampling(dn, run, sd15_model, vae, dino):
    src = image(6)
    lat = encode(vae, src)
    guidance = structure(dn, run, sd15_model, vae, dino, src, lambda_semantic=0.0)
    out = sample(dn, run, sd15_model, lat, guidance, strength=-1.0, resample=1, steps=8)
    assert torch.isfinite(out["samples"]).all()
    with pytest.raises(ValueError, match="strength"):
        sample(dn, run, sd15_model, lat, guidance, strength=0.0)


def test_guidance_built_for_another_model_is_an_error(dn, run, sd15_model, sdxl_model, vae, dino):
    src = image(7)
    guidance = structure(dn, run, sdxl_model, vae, dino, src)
    with pytest.raises(ValueError, match="built for an SDXL MODEL but this MODEL is SD1.x"):
        sample(dn, run, sd15_model, encode(vae, src), guidance)


def test_reference_batch_mismatch_is_a_clear_error(dn, run, sd15_model, vae, dino):
    src = image(8, batch=3)
    guidance = style(dn, run, sd15_model, vae, dino, image(9, batch=2))
    with pytest.raises(ValueError, match="3 image.*reference image has batch 2"):
        sample(dn, run, sd15_model, encode(vae, src), guidance)


def test_stock_ksampler_unchanged_after_a_run(dn, run, sd15_model, vae, dino):
    import sampling_helpers as h

    pos, neg = tm.conditioning(1), tm.conditioning(2)
    before = h.ksampler(sd15_model, pos, neg, tm.latent(0, size=8))
    src = image(10)
    sample(dn, run, sd15_model, encode(vae, src), structure(dn, run, sd15_model, vae, dino, src))
    after = h.ksampler(sd15_model, pos, neg, tm.latent(0, size=8))
    assert torch.equal(before, after)


def test_dino_terms_compose_with_zerocon_guided_sampler(zc, dn, run, sd15_model, vae, dino):
    """Inverted start + cross-attention (needs the reference branch) + DINO structure (needs none)."""
    import sampling_helpers as h

    src = image(11)
    lat = encode(vae, src)
    cap, edit = tm.conditioning(12), tm.conditioning(13)
    _, inversion, _ = h.invert(zc, run, sd15_model, lat, cap)
    xa = h.guidance(zc, run, nce=0.0)
    plain, _ = h.guided(zc, run, sd15_model, inversion, edit, guidance=xa)
    both, recon = h.guided(
        zc, run, sd15_model, inversion, edit, guidance=structure(dn, run, sd15_model, vae, dino, src, previous=xa)
    )
    assert torch.isfinite(both["samples"]).all() and torch.isfinite(recon["samples"]).all()
    assert not torch.equal(both["samples"], plain["samples"])
