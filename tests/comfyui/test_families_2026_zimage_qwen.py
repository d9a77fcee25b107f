"""The 2026 families on tiny models built from ComfyUI 0.33's own classes: Qwen-Image / Qwen-Image-Edit
(``dit_capture`` kind "qwen") and Z-Image (``joint_capture``, kind "lumina"), and the attention-kernel conventions
their captures need in ``text_probabilities`` (per-key 3-D masks, ``scale``, grouped-query keys).

Per family: recognised by its config class; guidance off, our inversion and sampler equal ComfyUI's stock euler on
the family's own sigmas; captured maps equal a float64 recomputation from the block's q and k with the family's RoPE
(and mask); one guided step lowers each loss; the MODEL is left exactly as it was after guided, interrupted and
failed runs; DiffuseIT runs; wrong latents get a clear error naming the expected shape. Every test on a model skips,
with the reason, on a ComfyUI without the family (feature detection).
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.samplers
import dit_helpers as dh
import pytest
import sampling_helpers as h
import tiny_families_lumina_qwen as tq
import torch
import torch.nn.functional as F
from conftest import pack_fixture, pack_module
from dit_helpers import _den, _inside_sampler
from test_diffuseit_nodes import dino, dino_nodes  # noqa: F401  (fixtures)
from test_dit_capture import _lin, _ln, _recording_patch, _rms, _rope_angles, _rotate, _snapshot

dc = pack_module("nodes.glue.dit_capture")
core_den = pack_module("zerocon_core.method.denoiser")
guidance = pack_module("zerocon_core.method.guidance")
CR = core_den.CaptureRequest

needs_qwen = pytest.mark.skipif(
    not tq.has_qwen_image(),
    reason="Qwen-Image is tested on ComfyUI's 2026 network (masked text, comfy-kitchen RoPE with the torch-path "
    "switch model_management.in_training); this ComfyUI has none, or an older one that ignores the text mask",
)


# -- text_probabilities: the kernels' conventions ----------------------------------------------------------------


def _dense(q, k, image, text, mask=None, scale=None):
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s + mask
    return s.softmax(-1)[:, :, image, text]


def test_per_key_3d_mask_is_read_as_comfyuis_kernels_read_it():
    """A (B, 1, L) additive mask (Qwen-Image's padded text) is (B, 1, 1, L): each batch row its own keys, every
    query row the same (not (1, B, 1, L), and not sliced to the image rows)."""
    gen = torch.Generator().manual_seed(2)
    b, heads, length, d = 2, 3, 11, 4
    q, k = torch.randn(2, b, heads, length, d, generator=gen, dtype=torch.float64)
    mask = torch.zeros(b, 1, length, dtype=torch.float64)
    mask[0, 0, 2:4] = -torch.finfo(torch.float64).max  # row 0: two padded text keys; row 1: none
    image, text = slice(5, 11), slice(0, 5)
    got = dc.text_probabilities(q, k, image, text, mask, dc.Chunking(2, 3))
    expect = _dense(q, k, image, text, mask.unsqueeze(1))
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    assert torch.equal(got[0, :, :, 2:4], torch.zeros_like(got[0, :, :, 2:4]))
    assert (got[1, :, :, 2:4] > 0).all()


def test_scale_and_grouped_query_keys():
    """The kernel's ``scale`` is the one used; keys with fewer heads (GQA) serve query heads in groups, as SDPA's
    ``enable_gqa`` does (query head h reads key head h // group)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    image, text = slice(3, 9), slice(0, 3)
    got = dc.text_probabilities(q, k, image, text, scale=0.7)
    expect = _dense(q, k.repeat_interleave(2, dim=1), image, text, scale=0.7)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    w = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    ga = torch.autograd.grad((got * w).sum(), (q, k))
    gd = torch.autograd.grad((expect * w).sum(), (q, k))
    for a, e in zip(ga, gd):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="4 query heads cannot share 3 key heads"):
        dc.text_probabilities(q, torch.randn(1, 3, 9, 8, dtype=torch.float64), image, text)


class _Recorder:
    def __init__(self):
        self.probs = {}

    def add_probs(self, name, probs, options):
        self.probs[name] = probs


def test_capture_override_reads_mask_scale_and_gqa_as_the_kernel_gets_them():
    """The override, called as ComfyUI calls the kernel (mask positional, (B, L, H*d) q and (B, L, Hkv*d) k,
    ``scale`` and ``enable_gqa`` keywords), records the kernel's own probabilities and passes every argument on."""
    gen = torch.Generator().manual_seed(4)
    b, length, heads, kv_heads, d = 2, 10, 4, 2, 8
    q = torch.randn(b, length, heads * d, generator=gen)
    k = torch.randn(b, length, kv_heads * d, generator=gen)
    v = torch.randn(b, length, kv_heads * d, generator=gen)
    mask = torch.zeros(b, 1, length)
    mask[1, 0, 1] = float("-inf")
    recorder = _Recorder()
    state = dc._CallState(recorder, (2, 3), dc.Chunking())
    to = {dc.TAG: dc._BlockContext("double.0.img2txt", length, slice(4, 10), slice(0, 4))}
    seen = []

    def kernel(*args, **kwargs):
        seen.append((args, kwargs))
        return "out"

    override = dc._capture_override(state, None)
    assert override(kernel, q, k, v, heads, mask, transformer_options=to, scale=0.5, enable_gqa=True) == "out"
    assert seen[0][0][4] is mask and seen[0][1]["scale"] == 0.5 and seen[0][1]["enable_gqa"]
    qh = q.double().view(b, length, heads, d).transpose(1, 2)
    kh = k.double().view(b, length, kv_heads, d).transpose(1, 2).repeat_interleave(2, dim=1)
    expect = _dense(qh, kh, slice(4, 10), slice(0, 4), mask.double().unsqueeze(1), scale=0.5)
    torch.testing.assert_close(recorder.probs["double.0.img2txt"].double(), expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(recorder.probs["double.0.img2txt"][1, :, :, 1], torch.zeros(heads, 6))


# -- Qwen-Image ------------------------------------------------------------------------------------------------


def _qwen(seed=21, layers=2):
    return tq.qwen_image(seed, layers)


@needs_qwen
def test_qwen_layer_table(zc):
    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        return den.dit_type, [(i.name, i.kind, i.block, i.level) for i in den.layers()]

    kind, layers = _inside_sampler(
        _qwen(layers=3), {"positive": tq.qwen_conditioning(1)}, body, latent=tq.qwen_latent(0)
    )  # fmt: skip
    assert kind == "qwen"
    assert layers == [
        (f"double.{i}.{what}", kind_, "double", i)
        for i in range(3)
        for what, kind_ in (("img2txt", "cross"), ("img", "self"))
    ]


def _qwen_qk(block, args):
    """q, k (B, H, L, d) of a Qwen-Image block ([txt; img]) in float64 from its weights, before RoPE."""
    vec = F.silu(args["vec"].double())
    attn, heads = block.attn, block.attn.heads
    out = []
    for x, mod, qp, kp, qn, kn in (
        (args["txt"], block.txt_mod[1], attn.add_q_proj, attn.add_k_proj, attn.norm_added_q, attn.norm_added_k),
        (args["img"], block.img_mod[1], attn.to_q, attn.to_k, attn.norm_q, attn.norm_k),
    ):
        shift, scale = _lin(vec, mod)[:, None].chunk(6, -1)[:2]
        xm = _ln(x.double()) * (1 + scale) + shift
        b, n, _ = xm.shape
        q = _lin(xm, qp).view(b, n, heads, -1).transpose(1, 2)
        k = _lin(xm, kp).view(b, n, heads, -1).transpose(1, 2)
        out.append((_rms(q, qn), _rms(k, kn)))
    return torch.cat((out[0][0], out[1][0]), 2), torch.cat((out[0][1], out[1][1]), 2)


def _qwen_ids(tokens: int, size: int, reference: bool = False) -> torch.Tensor:
    """Token positions (frame, row, column) as Qwen-Image sets them: text on the diagonal after the image's
    half-size, image rows / columns centred on 0; a reference image's tokens (Qwen-Image-Edit, method "index") after
    the image's, on frame 1."""
    grid = size // 2
    start = grid // 2
    txt = torch.arange(start, start + tokens, dtype=torch.float64)[:, None].repeat(1, 3)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    img = [
        torch.stack((torch.full((grid * grid,), float(f)), rows.flatten() - grid // 2, cols.flatten() - grid // 2), -1)
        for f in ((0, 1) if reference else (0,))
    ]
    return torch.cat([txt] + [i.double() for i in img])


@needs_qwen
@pytest.mark.parametrize(
    "padded, edit", [(0, False), (3, False), (3, True)], ids=["full", "padded-text", "edit-reference"]
)
def test_qwen_probabilities_equal_a_float64_recomputation_with_rope_and_mask(zc, padded, edit):
    """Captured maps = softmax over all keys of (RoPE q)(RoPE k)^T (+ the text padding mask), recomputed in float64
    from the block's weights and the token positions; padded text keys get exactly 0; features are the block's
    image output on the patch grid. Qwen-Image-Edit: the reference tokens follow the image's; the queries are the
    image grid's, the softmax runs over every key (the reference's too)."""
    model = _qwen().clone()
    seen = {}
    model.set_model_patch_replace(_recording_patch(seen, 1), "dit", "double_block", 1)
    tokens, size = 12, 8

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        req = CR(probs=frozenset({"double.1.img2txt"}), features=frozenset({"double.1.img"}))
        return den.predict(x, sigmas[0], [guider.conds["positive"]], req)[0]

    reference = tq.qwen_latent(9, size=size)["samples"] if edit else None
    cond = tq.qwen_conditioning(2, tokens=tokens, padded=padded, reference=reference)
    pred = _inside_sampler(model, {"positive": cond}, body, latent=tq.qwen_latent(1, size=size))
    dm = model.model.diffusion_model
    grid = size // 2
    assert seen[1]["img"].shape[1] == grid * grid * (2 if edit else 1)
    q, k = _qwen_qk(dm.transformer_blocks[1], seen[1])
    angles = _rope_angles(_qwen_ids(tokens, size, edit), tq.QWEN_AXES, 10000)
    q, k = _rotate(q, angles), _rotate(k, angles)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if padded:
        s[..., tokens - padded : tokens] = float("-inf")
    p = s.softmax(-1)
    got = pred.probs["double.1.img2txt"]
    assert got.shape == (1, 2, grid * grid, tokens) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), p[:, :, tokens : tokens + grid * grid, :tokens], rtol=1e-4, atol=1e-6)
    if padded:
        assert torch.equal(got[..., tokens - padded :], torch.zeros_like(got[..., tokens - padded :]))
    share = got.sum(-1)
    assert (share < 1).all() and (share > 0).all()
    expect = seen[1]["out"][:, : grid * grid].transpose(1, 2).reshape(1, -1, grid, grid)
    assert torch.equal(pred.features["double.1.img"], expect)


@needs_qwen
@dh.each_term(8)
def test_qwen_one_guided_step_lowers_each_loss(zc, term):
    """A gradient step through the whole network (RoPE on ComfyUI's torch path) lowers the loss."""
    conds = {"positive": tq.qwen_conditioning(7, padded=2), "negative": tq.qwen_conditioning(8, padded=2)}
    # a small step: these random tiny DiTs are curved at 1e-2
    dh.assert_one_step_lowers_the_loss(zc, _qwen(), term, conds, latent=tq.qwen_latent(2), step_size=1e-3)


def _stock(model, pos, neg, lat):
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(5))
    return h.stock_euler(model, pos, neg, 2.0, noise, lat, sigmas)


def _assert_guided_runs_leave_the_model_as_it_was(zc, model, pos, neg, lat):
    """A guided run (no weight requires grad during the loss), an interrupted one and a failing one: the weights are
    the very same inference tensors with the same flags, the options the same, and stock sampling bit-identical."""
    reference = _stock(model, pos, neg, lat["samples"])
    tensors, flags, options = _snapshot(model)

    def run(stop_at, error=comfy.model_management.InterruptProcessingException):
        term = dh.WatchingTerm(weight=1.0, model=model.model.diffusion_model, stop_at=stop_at, error=error)
        return dh.guided_run(zc, model, term, pos, neg, lat), term.seen

    out, seen = run(-1)
    assert torch.isfinite(out).all() and seen and not any(seen)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(1)
    with pytest.raises(RuntimeError):
        run(0, RuntimeError)
    after, after_flags, after_options = _snapshot(model)
    assert after.keys() == tensors.keys() and all(after[n] is tensors[n] for n in tensors)
    assert after_flags == flags and all(t.is_inference() for t in after.values())
    assert after_options == options
    assert torch.equal(_stock(model, pos, neg, lat["samples"]), reference)


@needs_qwen
def test_qwen_guided_interrupted_and_failed_runs_leave_the_model_as_it_was(zc):
    model = _qwen()
    pos, neg, lat = tq.qwen_conditioning(10, padded=2), tq.qwen_conditioning(11), tq.qwen_latent(12)
    _assert_guided_runs_leave_the_model_as_it_was(zc, model, pos, neg, lat)


# -- Qwen-Image as a family: detection, inversion and sampling against stock euler ---------------------------------

STEPS = 4


@needs_qwen
def test_qwen_image_is_recognised_by_its_config_class(zc):
    fam = zc.families.detect_family(_qwen())
    assert (fam.name, fam.prediction_type, fam.latent_channels, fam.cfg_style) == ("Qwen-Image", "flow", 16, "cfg")
    assert fam.adapter.capture == "qwen" and fam.adapter.frame_axis
    assert fam.native_size == 1328
    # the same network under another config class is not claimed (recognition by class, never by shapes)
    import comfy.model_base
    import comfy.supported_models

    class Other(comfy.supported_models.QwenImage):
        pass

    base = _qwen().model
    assert zc.families.REGISTRY.claiming(base).name == "Qwen-Image"
    base.model_config = Other(tq.qwen_image_config())
    assert zc.families.REGISTRY.claiming(base).name == "Qwen-Image"  # subclasses of the config are included
    assert type(base) is comfy.model_base.QwenImage


@needs_qwen
def test_qwen_inversion_equals_stock_euler_on_flipped_sigmas(zc, run):

    model = _qwen()
    source = tq.qwen_conditioning(1, padded=2)
    lat = tq.qwen_latent(3)
    x_t, _, sigmas = h.invert(zc, run, model, lat, source, steps=STEPS)
    assert x_t["samples"].shape == lat["samples"].shape
    up = h.flip(sigmas)
    fmt = model.model.latent_format
    last = h.stock_euler_last(model, source, lat, up)
    torch.testing.assert_close(x_t["samples"], fmt.process_out(last), rtol=0, atol=1e-5)


@needs_qwen
@pytest.mark.parametrize("reference", [False, True], ids=["qwen-image", "qwen-image-edit"])
def test_qwen_guided_sampler_without_guidance_equals_stock_euler(zc, run, reference):
    """Qwen-Image, and Qwen-Image-Edit (the source image's latent as the reference in both conditionings)."""

    model = _qwen()
    lat = tq.qwen_latent(4)
    ref = lat["samples"] if reference else None
    source = tq.qwen_conditioning(1, padded=2, reference=ref)
    edit = tq.qwen_conditioning(2, reference=ref)
    _, inversion, sigmas = h.invert(zc, run, model, lat, source, steps=STEPS)
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=4.0)
    stock = h.stock_euler_from_inversion(model, edit, source, 4.0, inversion, sigmas)
    torch.testing.assert_close(out["samples"], stock, rtol=0, atol=1e-5)
    assert float((out["samples"] - inversion.latent).abs().max()) > 0.1  # it did sample


@needs_qwen
def test_qwen_guided_sampler_with_both_terms_runs(zc, run):

    model = _qwen()
    source, edit = tq.qwen_conditioning(1, padded=2), tq.qwen_conditioning(2)
    _, inversion, _ = h.invert(zc, run, model, tq.qwen_latent(5), source, steps=3)
    terms = (guidance.CrossAttentionGuidance(weight=1.0), guidance.PatchNCEGuidance(weight=1.0, num_patches=8))
    plain, _ = h.guided(zc, run, model, inversion, edit, cfg=4.0)
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=4.0, guidance=terms)
    assert torch.isfinite(out["samples"]).all()
    assert float((out["samples"] - plain["samples"]).abs().max()) > 1e-4


@needs_qwen
def test_qwen_wrong_latents_name_the_expected_shape(zc, run):
    import tiny_models as tm

    with pytest.raises(ValueError, match=r"Qwen-Image needs a 16-channel image latent \(B, 16, 1, H, W\); got shape"):
        h.invert(zc, run, _qwen(), {"samples": torch.randn(1, 16, 2, 8, 8)}, tq.qwen_conditioning(1))
    with pytest.raises(ValueError, match=r"Flux needs a 16-channel image latent \(B, 16, H, W\); got shape \(1, 16, 1"):
        h.invert(zc, run, tm.flux(), tq.qwen_latent(1), tm.flow_conditioning(1))


# -- DiffuseIT on Qwen-Image -----------------------------------------------------------------------------------------


dn = pack_fixture("nodes.classes.diffuseit_nodes")


def _assert_diffuseit_runs_and_leaves_everything_as_it_was(dn, run, dino, model, vae, src, lat, conds):  # noqa: F811
    """DiffuseIT with structure + style terms on ``lat`` (the VAE's encoding of ``src``): the DINO terms move the
    latent, and the VAE's, DINO's and the MODEL's weights, and a stock sampling, are left as they were."""
    from test_diffuseit_nodes import image, structure, style

    pos, neg = conds
    guidance = style(dn, run, model, vae, dino, image(5), previous=structure(dn, run, model, vae, dino, src))
    modules = (vae.first_stage_model, dino.model, model.model)
    before = [[(id(p), p.is_inference(), p.requires_grad) for p in m.parameters()] for m in modules]
    reference = _stock(model, pos, neg, lat["samples"])

    def sample(terms):
        kw = dict(model=model, positive=pos, negative=neg, latent=lat, guidance=terms, steps=6, cfg=3.0,
                  strength=0.5, resample=2, seed=3, step_mode="raw", step_size=0.02)  # fmt: skip
        return run(dn.ZeroConDiffuseITSampler, **kw)[0]

    plain = sample(structure(dn, run, model, vae, dino, src, weight=0.0))
    out = sample(guidance)
    assert out["samples"].shape == lat["samples"].shape and torch.isfinite(out["samples"]).all()
    assert float((out["samples"] - plain["samples"]).abs().max()) > 1e-4, "DINO guidance did not move the latent"
    after = [[(id(p), p.is_inference(), p.requires_grad) for p in m.parameters()] for m in modules]
    assert after == before
    assert torch.equal(_stock(model, pos, neg, lat["samples"]), reference)


@needs_qwen
def test_qwen_diffuseit_runs_with_the_wan_vae_and_leaves_everything_as_it_was(dn, run, dino):  # noqa: F811
    from test_diffuseit_nodes import image

    model, vae = _qwen(), tq.wan21_vae(0)
    assert vae.latent_dim == 3 and vae.latent_channels == 16
    src = image(4)
    with torch.inference_mode():
        lat = {"samples": vae.encode(src)}
    assert lat["samples"].shape[:3] == (1, 16, 1)
    pos, neg = tq.qwen_conditioning(1, padded=2), tq.qwen_conditioning(2)
    _assert_diffuseit_runs_and_leaves_everything_as_it_was(dn, run, dino, model, vae, src, lat, (pos, neg))


@needs_qwen
def test_qwen_diffuseit_refuses_an_image_vae(dn, run, dino):  # noqa: F811
    import tiny_models as tm
    from test_diffuseit_nodes import image, structure

    with pytest.raises(ValueError, match=r"16-channel image latents \(B, 16, 1, H, W\).*lighttaew2_1 for Qwen-Image"):
        structure(dn, run, _qwen(), tm.flow_vae(0), dino, image(1))


@pytest.mark.skipif(tq.has_qwen_image() or not hasattr(__import__("comfy.supported_models").supported_models, "QwenImage"),
                    reason="this ComfyUI's Qwen-Image is the supported one (or it has none)")  # fmt: skip
def test_older_qwen_image_is_refused_by_feature_detection(zc):
    """An older ComfyUI's Qwen-Image (no torch-path switch, no text mask) is refused with the reason."""
    with pytest.raises(zc.families.UnsupportedModelError, match="ComfyUI without the torch-path switch"):
        zc.families.detect_family(tq.qwen_image())


# -- Z-Image ---------------------------------------------------------------------------------------------------------

needs_zimage = pytest.mark.skipif(
    not tq.has_z_image(), reason="this ComfyUI has no Z-Image (comfy.supported_models.ZImage, ComfyUI 0.33+)"
)


def _z(seed=31, layers=2, pad=tq.ZIMAGE_PAD):
    return tq.z_image(seed, layers, pad)


def _z_latent(seed, size=10):
    """A Z-Image LATENT (Flux layout); 10 x 10 makes a 5 x 5 grid, padded to 32 image tokens."""
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(1, 16, size, size, generator=gen)}


@needs_zimage
def test_z_image_is_recognised_by_its_config_class(zc):
    import comfy.supported_models
    import tiny_models as tm

    fam = zc.families.detect_family(_z())
    assert (fam.name, fam.prediction_type, fam.latent_channels, fam.cfg_style) == ("Z-Image", "flow", 16, "cfg")
    assert (fam.adapter.capture, fam.tiny_decoder, fam.native_size) == ("lumina", "taef1", 1024)
    # Lumina 2.0 (the same NextDiT under its own config class) is not claimed: the general error names the network
    lumina = tm._dit_patcher(comfy.supported_models.Lumina2(tq.z_image_config()), 1)
    with pytest.raises(zc.families.UnsupportedModelError, match=r"this MODEL is a NextDiT network \(Lumina2\)"):
        zc.families.detect_family(lumina)


@needs_zimage
def test_z_image_layer_table(zc):
    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        return den.dit_type, [(i.name, i.kind, i.block, i.level) for i in den.layers()]

    kind, layers = _inside_sampler(_z(layers=3), {"positive": tq.z_image_conditioning(1)}, body, latent=_z_latent(0))
    assert kind == "lumina"
    assert layers == [
        (f"joint.{i}.{what}", kind_, "joint", i)
        for i in range(3)
        for what, kind_ in (("img2txt", "cross"), ("img", "self"))
    ]


def _z_qk(layer, x, adaln):
    """q, k (B, H, L, d) of a NextDiT main layer in float64 from its weights, before RoPE."""
    attn = layer.attention
    scale_msa = _lin(adaln.double(), layer.adaLN_modulation[0]).chunk(4, dim=1)[0]
    h = _rms(x.double(), layer.attention_norm1) * (1 + scale_msa[:, None])
    qkv = _lin(h, attn.qkv)
    b, n, _ = qkv.shape
    d = attn.head_dim
    q, k = (
        qkv[..., : attn.n_local_heads * d],
        qkv[..., attn.n_local_heads * d : (attn.n_local_heads + attn.n_local_kv_heads) * d],
    )
    q = q.view(b, n, attn.n_local_heads, d).transpose(1, 2)
    k = k.view(b, n, attn.n_local_kv_heads, d).transpose(1, 2)
    return _rms(q, attn.q_norm), _rms(k, attn.k_norm)


def _z_ids(caption: int, grid: int, multiple: int) -> torch.Tensor:
    """Z-Image's token positions: caption tokens (padding included) at (1 + i, 0, 0), image tokens at
    (Pc + 1, row, column), image padding at 0."""
    pc = -(-caption // multiple) * multiple
    n = grid * grid
    pi = -(-n // multiple) * multiple
    cap = torch.zeros(pc, 3, dtype=torch.float64)
    cap[:, 0] = torch.arange(pc) + 1.0
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    img = torch.zeros(pi, 3, dtype=torch.float64)
    img[:n] = torch.stack((torch.full((n,), pc + 1.0), rows.flatten(), cols.flatten()), -1).double()
    return torch.cat((cap, img))


@needs_zimage
def test_z_image_probabilities_equal_a_float64_recomputation_with_rope(zc):
    """Captured maps of a main layer = softmax over all keys (caption and image padding included) of
    (RoPE q)(RoPE k)^T, recomputed in float64 from the layer's weights and the token positions; the text columns are
    the caption's real tokens, the rows the image grid's (not its padding); features = the layer's image output."""
    model = _z()
    dm = model.model.diffusion_model
    tokens, size, seen = 11, 10, {}

    def hook(module, args, kwargs):
        seen["x"], seen["adaln"] = args[0].detach().clone(), args[3].detach().clone()

    def out_hook(module, args, out):
        seen["out"] = out.detach().clone()

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        req = CR(probs=frozenset({"joint.1.img2txt"}), features=frozenset({"joint.1.img"}))
        return den.predict(x, sigmas[0], [guider.conds["positive"]], req)[0]

    handles = [
        dm.layers[1].register_forward_pre_hook(hook, with_kwargs=True),
        dm.layers[1].register_forward_hook(out_hook),
    ]
    try:
        pred = _inside_sampler(
            model, {"positive": tq.z_image_conditioning(2, tokens=tokens)}, body, latent=_z_latent(1)
        )
    finally:
        for handle in handles:
            handle.remove()
    grid = size // 2
    ids = _z_ids(tokens, grid, tq.ZIMAGE_PAD)
    assert seen["x"].shape[1] == len(ids) == 16 + 32
    q, k = _z_qk(dm.layers[1], seen["x"], seen["adaln"])
    angles = _rope_angles(ids, tq.ZIMAGE_AXES, 256.0)
    q, k = _rotate(q, angles), _rotate(k, angles)
    p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    got = pred.probs["joint.1.img2txt"]
    assert got.shape == (1, 4, grid * grid, tokens) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), p[:, :, 16 : 16 + grid * grid, :tokens], rtol=1e-4, atol=1e-6)
    share = got.sum(-1)
    assert (share < 1).all() and (share > 0).all()
    expect = seen["out"][:, 16 : 16 + grid * grid].transpose(1, 2).reshape(1, -1, grid, grid)
    assert torch.equal(pred.features["joint.1.img"], expect)


@needs_zimage
@dh.each_term(8)
def test_z_image_one_guided_step_lowers_each_loss(zc, term):
    """A gradient step through the whole network (fused QK-norm + RoPE on ComfyUI's torch path) lowers the loss."""
    conds = {"positive": tq.z_image_conditioning(7), "negative": tq.z_image_conditioning(8)}
    # a small step: these random tiny DiTs are curved at 1e-2
    latent = _z_latent(2, size=8)
    dh.assert_one_step_lowers_the_loss(zc, _z(), term, conds, latent=latent, step_size=1e-3)


@needs_zimage
def test_z_image_guided_interrupted_and_failed_runs_leave_the_model_as_it_was(zc):
    model = _z()
    pos, neg, lat = tq.z_image_conditioning(10), tq.z_image_conditioning(11), _z_latent(12, size=8)
    _assert_guided_runs_leave_the_model_as_it_was(zc, model, pos, neg, lat)


@needs_zimage
def test_z_image_inversion_equals_stock_euler_on_flipped_sigmas(zc, run):

    model = _z()
    source = tq.z_image_conditioning(1)
    lat = _z_latent(3, size=8)
    x_t, _, sigmas = h.invert(zc, run, model, lat, source, steps=STEPS)
    up = h.flip(sigmas)
    fmt = model.model.latent_format
    last = h.stock_euler_last(model, source, lat, up)
    torch.testing.assert_close(x_t["samples"], fmt.process_out(last), rtol=0, atol=1e-5)


@needs_zimage
def test_z_image_guided_sampler_without_guidance_equals_stock_euler(zc, run):

    model = _z()
    source, edit = tq.z_image_conditioning(1), tq.z_image_conditioning(2)
    _, inversion, sigmas = h.invert(zc, run, model, _z_latent(4, size=8), source, steps=STEPS)
    out, _ = h.guided(zc, run, model, inversion, edit, cfg=4.0)
    stock = h.stock_euler_from_inversion(model, edit, source, 4.0, inversion, sigmas)
    # 1e-5 of the output's scale (about 10 on this model): ours combines CFG on velocities, the stock guider on
    # denoised latents, the same sum in another float32 rounding
    scale = max(1.0, float(stock.abs().max()))
    torch.testing.assert_close(out["samples"], stock, rtol=0, atol=1e-5 * scale)
    assert float((out["samples"] - inversion.latent).abs().max()) > 0.1  # it did sample
    terms = (guidance.CrossAttentionGuidance(weight=1.0), guidance.PatchNCEGuidance(weight=1.0, num_patches=8))
    guided, _ = h.guided(zc, run, model, inversion, edit, cfg=4.0, guidance=terms)
    assert torch.isfinite(guided["samples"]).all()
    assert float((guided["samples"] - out["samples"]).abs().max()) > 1e-4


@needs_zimage
def test_z_image_diffuseit_runs_and_leaves_everything_as_it_was(dn, run, dino):  # noqa: F811
    import tiny_models as tm
    from test_diffuseit_nodes import image

    model, vae = _z(), tm.flow_vae(0)
    src = image(4)
    with torch.inference_mode():
        lat = {"samples": vae.encode(src)}
    pos, neg = tq.z_image_conditioning(1), tq.z_image_conditioning(2)
    _assert_diffuseit_runs_and_leaves_everything_as_it_was(dn, run, dino, model, vae, src, lat, (pos, neg))


@needs_zimage
@needs_qwen
def test_qwen_image_latent_or_conditioning_on_z_image_names_what_is_expected(zc, run, dn, dino):  # noqa: F811
    import tiny_models as tm
    from test_diffuseit_nodes import image, structure

    with pytest.raises(
        ValueError, match=r"Z-Image needs a 16-channel image latent \(B, 16, H, W\); got shape \(1, 16, 1, 8, 8\)"
    ):
        h.invert(zc, run, _z(), tq.qwen_latent(1), tq.z_image_conditioning(1))
    # a conditioning of another width (here 48 vs the tiny Z-Image's 64; the real ones: Qwen-Image 3584, Z-Image 2560)
    qwen_like = [[torch.randn(1, 12, 48), {}]]
    expected = r"the %s conditioning is 48 wide but this Z-Image MODEL takes 64-wide text \(its Z-Image text encoder\)"
    lat = _z_latent(1, size=8)
    with pytest.raises(ValueError, match=expected % "caption"):
        h.invert(zc, run, _z(), lat, qwen_like)
    _, inversion, _ = h.invert(zc, run, _z(), lat, tq.z_image_conditioning(1), steps=2)
    with pytest.raises(ValueError, match=expected % "edited"):
        h.guided(zc, run, _z(), inversion, qwen_like)
    terms = structure(dn, run, _z(), tm.flow_vae(0), dino, image(1))
    with pytest.raises(ValueError, match=expected % "positive"):
        run(dn.ZeroConDiffuseITSampler, model=_z(), positive=qwen_like, negative=tq.z_image_conditioning(2),
            latent=lat, guidance=terms, steps=4, cfg=3.0, strength=0.5, resample=1, seed=3, step_mode="raw",
            step_size=0.02)  # fmt: skip
    with pytest.raises(ValueError, match=r"the caption conditioning is 64 wide but this Qwen-Image MODEL takes 48"):
        h.invert(zc, run, tq.qwen_image(), tq.qwen_latent(1), tq.z_image_conditioning(1))


def test_joint_capture_reads_only_the_main_layers_joint_attention():
    """The override records a wanted main layer's joint attention (all caption + image keys) once per forward, and
    nothing from a refiner's attention (fewer keys), another layer, or outside the main layers, even where ComfyUI's
    ``block_type`` / ``block_index`` are left over from an earlier layer."""
    jc = pack_module("nodes.glue.joint_capture")
    recorder = _Recorder()
    state = jc._CallState(recorder, (2, 2), dc.Chunking(), {1: "joint.1.img2txt"}, {}, 8)
    state.layout(5)  # caption 5 -> 8 tokens, image 4 -> 8 tokens: 16 keys
    assert (state.total, state.image, state.text) == (16, slice(8, 12), slice(0, 5))
    override = jc._override(state, None)
    gen = torch.Generator().manual_seed(5)

    def call(length, **to):
        q, k = torch.randn(2, 1, 2, length, 4, generator=gen)
        return override(lambda *a, **kw: "out", q, k, k, 2, None, skip_reshape=True, transformer_options=to)

    assert call(8, block_type="double", block_index=1) == "out"  # a refiner's attention: 8 keys
    call(16, block_index=1)  # not a main layer
    call(16, block_type="double", block_index=0)  # not wanted
    assert recorder.probs == {}
    call(16, block_type="double", block_index=1)
    first = recorder.probs["joint.1.img2txt"]
    assert first.shape == (1, 2, 4, 5)
    call(16, block_type="double", block_index=1)  # a second joint attention in the same layer: not this one
    assert recorder.probs["joint.1.img2txt"] is first


@needs_zimage
def test_z_image_reference_latents_are_a_clear_error_when_captured(zc, run):
    """Z-Image Omni's reference tokens change the joint layout the captures read: refused, not misread."""

    model, lat = _z(), _z_latent(5, size=8)
    cond = tq.z_image_conditioning(1)
    _, inversion, _ = h.invert(zc, run, model, lat, cond, steps=2)
    edit = [[cond[0][0], {"reference_latents": [lat["samples"]]}]]
    with pytest.raises(ValueError, match="Z-Image reference images .* are not supported"):
        h.guided(zc, run, model, inversion, edit, cfg=1.0, guidance=(guidance.CrossAttentionGuidance(weight=1.0),))
