"""Flux.2 (dev and Klein, and Klein's edit mode) on tiny models built from ComfyUI 0.33's own classes
(``supported_models.Flux2`` / ``model_base.Flux2``: global modulation, 4-axis RoPE, 128-channel latents).

Guidance off, our inversion and Guided Sampler equal ComfyUI's stock Euler on the model's own sigmas (1e-5), with
and without a reference latent; the captured text-to-image probabilities equal a float64 recomputation from the
block's q and k with the 4-axis RoPE (text positions on axis 3) over the 512 text columns ``model_base.Flux2`` pads
to; one guided step lowers each loss; guided, interrupted and failed runs leave the MODEL exactly as it was; a
Flux.1 latent into Flux.2 and the reverse name the channels expected. Skipped where ComfyUI has no Flux.2.
"""

from __future__ import annotations

import math

import dit_helpers as dh
import pytest
import sampling_helpers as h
import tiny_families as tf
import tiny_models as tm
import torch
from conftest import pack_module
from test_diffuseit_nodes import dino, dino_nodes  # noqa: F401  (fixtures)
from test_dit_capture import _rope_angles, _rotate, _sharp
from test_families_2026_flux import _assert_diffuseit_runs, _assert_guided_runs_leave_the_model_as_it_was, _chroma_qk

guidance = pack_module("zerocon_core.method.guidance")
core_den = pack_module("zerocon_core.method.denoiser")

STEPS = 4
#: The text length ``model_base.Flux2`` left-pads every conditioning to.
FLUX2_TEXT = 512

flux2 = pytest.mark.skipif(not tf.has_flux2(), reason="this ComfyUI has no Flux.2 (supported_models.Flux2)")
pytestmark = flux2


def _conds(klein=False, reference=None):
    g = None if klein else 4.0
    return (
        tf.flux2_conditioning(1, guidance=g, reference=reference),
        tf.flux2_conditioning(2, guidance=g, reference=reference),
    )


def test_flux2_is_recognised_by_its_config_class(zc):
    import comfy.model_base

    model = tf.flux2()
    assert type(model.model) is comfy.model_base.Flux2
    fam = zc.families.detect_family(model)
    assert (fam.name, fam.prediction_type, fam.latent_channels, fam.cfg_style, str(fam)) == (
        "Flux.2",
        "flow",
        128,
        "distilled",
        "Flux.2-dev (flow matching, guidance-distilled)",
    )
    assert (fam.tiny_decoder, fam.latent_scale, fam.native_size) == ("taef2", 16, 1024)
    klein = zc.families.detect_family(tf.flux2(klein=True))
    assert (klein.cfg_style, str(klein)) == ("cfg", "Flux.2-Klein (flow matching)")
    assert zc.families.detect_family(tm.flux()).name == "Flux"  # a Flux.1 is still Flux.1
    assert "Flux, Flux.2, " in zc.families.SUPPORTED


@pytest.mark.parametrize("mode", ["dev", "klein", "klein-edit"])
def test_flux2_inversion_and_sampler_equal_stock_euler(zc, run, mode):
    """Inversion = stock Euler on the flipped sigmas (up to the last level, as for every flow family); the Guided
    Sampler without guidance = stock Euler from x_T; Klein's edit mode with a 128-channel reference latent."""
    klein, cfg = mode != "dev", (1.0 if mode == "dev" else 2.0)
    model = tf.flux2(klein=klein)
    ref = tf.flux2_latent(9, size=6)["samples"] if mode == "klein-edit" else None
    source, edit = _conds(klein, ref)
    lat = tf.flux2_latent(3)
    _, inversion, sigmas = h.invert(zc, run, model, lat, source, steps=STEPS)
    up = h.flip(sigmas)
    ours = zc.sampling.ZeroConKSampler(zc.sampling.inversion_function, extra_options={})
    with torch.inference_mode():
        zeros = torch.zeros_like(lat["samples"])
        ours_short = h.stock_guider(model, source, source, 1.0).sample(zeros, lat["samples"], ours, up[:-1])
    stock = h.stock_euler(model, source, source, 1.0, zeros, lat["samples"], up[:-1])
    torch.testing.assert_close(ours_short, stock * (1 - float(up[-2])), rtol=0, atol=1e-5)
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=cfg)
    torch.testing.assert_close(
        out["samples"], h.stock_euler_from_inversion(model, edit, source, cfg, inversion, sigmas), rtol=0, atol=1e-5
    )
    assert float((out["samples"] - inversion.latent).abs().max()) > 0.1
    if ref is not None:  # the reference reaches the network
        other, _ = h.guided(zc, run, model, inversion, tf.flux2_conditioning(2, guidance=None), cfg=cfg)
        assert float((out["samples"] - other["samples"]).abs().max()) > 1e-4


def _positions(index, rows, cols):
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    n = rows * cols
    return torch.stack((torch.full((n,), float(index)), r.flatten(), c.flatten(), torch.zeros(n)), -1)


@pytest.mark.parametrize("with_reference", [False, True], ids=["plain", "edit-mode"])
def test_flux2_probabilities_equal_a_float64_recomputation_with_4_axis_rope(zc, with_reference):
    """Double and single blocks: softmax over every key (512 text columns, the left padding included; image; any
    reference) of (RoPE q)(RoPE k)^T, recomputed in float64 from the blocks' weights and the global modulations,
    with the text position on RoPE axis 3 and a reference at index 10; rows are the image tokens only."""
    model = _sharp(tf.flux2(klein=True)).clone()
    dm = model.model.diffusion_model
    tokens, grid = 12, 8
    n = grid * grid
    ref = tf.flux2_latent(42, size=6)["samples"] if with_reference else None
    cond = tf.flux2_conditioning(2, tokens=tokens, guidance=None, reference=ref)
    pred, seen = dh.first_blocks_captured(zc, model, cond, latent=tf.flux2_latent(70, size=grid))
    text = torch.zeros(FLUX2_TEXT, 4)
    text[:, 3] = torch.arange(FLUX2_TEXT)
    parts = [text, _positions(0, grid, grid)] + ([_positions(10, 6, 6)] if with_reference else [])
    ids = torch.cat(parts)
    assert seen["double"]["txt"].shape[1] == FLUX2_TEXT  # padded on the left by model_base.Flux2
    assert seen["double"]["img"].shape[1] == n + (36 if with_reference else 0)  # the reference follows the image
    angles = _rope_angles(ids, dm.params.axes_dim, dm.params.theta)
    for name, single in (("double", False), ("single", True)):
        block = (dm.single_blocks if single else dm.double_blocks)[0]
        q, k = _chroma_qk(block, seen[name], single)
        q, k = _rotate(q, angles), _rotate(k, angles)
        p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        got = pred.probs[f"{name}.0.img2txt"]
        assert got.shape == (1, dm.num_heads, n, FLUX2_TEXT)
        image = slice(FLUX2_TEXT, FLUX2_TEXT + n)
        torch.testing.assert_close(got.double(), p[:, :, image, :FLUX2_TEXT], rtol=1e-4, atol=1e-6)
        img = seen[name]["out"][:, image] if single else seen[name]["out"][:, :n]
        assert torch.equal(pred.features[f"{name}.0.img"], img.transpose(1, 2).reshape(1, -1, grid, grid))


@dh.each_term(16)
def test_flux2_one_guided_step_lowers_each_loss(zc, term):
    ref = tf.flux2_latent(9, size=6)["samples"]
    conds = {
        "positive": tf.flux2_conditioning(7, guidance=None, reference=ref),
        "negative": tf.flux2_conditioning(8, guidance=None, reference=ref),
    }
    model = _sharp(tf.flux2(klein=True))
    # from a noised latent: at x = 0 (zero noise at sigma 1) this tiny network's loss is too curved for the step
    dh.assert_one_step_lowers_the_loss(zc, model, term, conds, latent=tf.flux2_latent(70), noise_seed=3)


def test_flux2_guided_interrupted_and_failed_runs_leave_the_model_as_it_was(zc, run):
    source, edit = _conds(klein=True)
    lat = tf.flux2_latent(7, size=4)
    _assert_guided_runs_leave_the_model_as_it_was(zc, run, tf.flux2(klein=True), source, edit, lat, cfg=2.0)


def test_flux2_diffuseit_runs_and_decodes_with_its_128_channel_vae(run, dino):  # noqa: F811
    """DiffuseIT on Klein through a tiny 128-channel VAE (its latent batch norm, 16 px per cell): the DINO terms move
    the latent, seeded runs repeat, and the MODEL is left as it was."""
    lat = _assert_diffuseit_runs(
        run, dino, tf.flux2(klein=True), _conds(klein=True), cfg=2.0, repeat=True, vae=tf.flux2_vae(0),
        stock_latent=tf.flux2_latent(0, size=4),
    )  # fmt: skip
    assert lat["samples"].shape == (1, 128, 4, 4)  # a 64 px image


def test_a_flux1_latent_or_conditioning_into_flux2_names_what_is_expected(zc, run):
    """A Flux.1 LATENT (16 channels, /8) into a Flux.2 MODEL: the error names Flux.2's 128 channels and the shape;
    a conditioning of another width (here 48 vs the tiny Flux.2's 64; real Flux.1 T5 4096 vs Klein's 7680) names the
    width its ``txt_in`` takes."""
    with pytest.raises(
        ValueError, match=r"Flux\.2 needs a 128-channel image latent \(B, 128, H, W\); got shape \(1, 16, 8, 8\)"
    ):
        h.invert(zc, run, tf.flux2(), tm.flow_latent(1, size=8), tf.flux2_conditioning(1), steps=2)
    other = [[torch.randn(1, 12, 48), {"pooled_output": None, "guidance": 4.0}]]
    with pytest.raises(
        ValueError,
        match=r"the caption conditioning is 48 wide but this Flux\.2 MODEL takes 64-wide text \(its Flux\.2 text encoder\)",
    ):
        h.invert(zc, run, tf.flux2(), tf.flux2_latent(1, size=4), other, steps=2)
